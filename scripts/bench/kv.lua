-- wrk script for scripts/bench_peers.sh: one workload against several servers, thread i
-- talking to server i (mod the number of servers), keys `key-%06d` uniform over KEYS keys,
-- 100-byte values. Environment:
--   BENCH_TARGETS  host:port,host:port,...   the servers
--   BENCH_MODE     mendkv_put | mendkv_get | etcd_put | etcd_get
--   BENCH_QUERY    mendkv: the query string (w=quorum, r=one, ...); etcd_get: "serializable"
--                  for a serializable range read (default linearizable)
--   BENCH_BUCKET   mendkv bucket (default bench)
--   BENCH_KEYS     number of keys (default 100000)
--   BENCH_PRELOAD  1: write every key once, in order (spread over the threads), then stop;
--                  each thread then creates BENCH_DONE_DIR/thread-N (wrk itself runs on
--                  until its duration ends, so the caller waits for those files and stops it)
local mode = os.getenv("BENCH_MODE") or "mendkv_put"
local query = os.getenv("BENCH_QUERY") or ""
local bucket = os.getenv("BENCH_BUCKET") or "bench"
local keys = tonumber(os.getenv("BENCH_KEYS") or "100000")
local preload = os.getenv("BENCH_PRELOAD") == "1"
local value = string.rep("v", 100)

local thread_count = 0
function setup(thread)
  local targets = {}
  for target in string.gmatch(os.getenv("BENCH_TARGETS") or "", "[^,]+") do
    local host, port = target:match("([^:]+):(%d+)")
    targets[#targets + 1] = wrk.lookup(host, port)[1]
  end
  thread_count = thread_count + 1
  thread.addr = targets[((thread_count - 1) % #targets) + 1]
  thread:set("thread_id", thread_count)
end

local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local function base64(data)
  local out = {}
  for i = 1, #data, 3 do
    local a, b, c = data:byte(i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local function char(shift)
      local index = math.floor(n / shift) % 64 + 1
      return alphabet:sub(index, index)
    end
    out[#out + 1] = char(262144) .. char(4096) .. (b and char(64) or "=") .. (c and char(1) or "=")
  end
  return table.concat(out)
end
local value64 = base64(value)
local key64 = {}

local threads, next_key
function init(args)
  -- Seeded per thread: the same run issues the same keys.
  math.randomseed(thread_id)
  threads = tonumber(os.getenv("BENCH_THREADS") or "3")
  next_key = thread_id - 1
end

local function pick()
  if preload then
    local k = next_key
    if k >= keys then
      k = keys - 1
    end
    next_key = next_key + threads
    return k
  end
  return math.random(0, keys - 1)
end

function request()
  local k = pick()
  local key = string.format("key-%06d", k)
  if mode == "mendkv_put" then
    return wrk.format("PUT", "/kv/" .. bucket .. "/" .. key .. "?" .. query,
      { ["Content-Type"] = "application/octet-stream" }, value)
  elseif mode == "mendkv_get" then
    return wrk.format("GET", "/kv/" .. bucket .. "/" .. key .. "?" .. query)
  end
  local encoded = key64[k]
  if not encoded then
    encoded = base64(key)
    key64[k] = encoded
  end
  if mode == "etcd_put" then
    return wrk.format("POST", "/v3/kv/put", { ["Content-Type"] = "application/json" },
      '{"key":"' .. encoded .. '","value":"' .. value64 .. '"}')
  end
  local serializable = query == "serializable" and ',"serializable":true' or ""
  return wrk.format("POST", "/v3/kv/range", { ["Content-Type"] = "application/json" },
    '{"key":"' .. encoded .. '"' .. serializable .. '}')
end

local finished = false
function response(status, headers, body)
  -- Past every key by more than the requests in flight: every key has been written.
  if preload and not finished and next_key >= keys + threads * 200 then
    finished = true
    local marker = io.open((os.getenv("BENCH_DONE_DIR") or ".") .. "/thread-" .. thread_id, "w")
    if marker then
      marker:close()
    end
    wrk.thread:stop()
  end
end
