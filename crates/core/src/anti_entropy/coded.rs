//! Rateless invertible Bloom lookup tables (Yang, Gilad, Alizadeh: "Practical Rateless Set
//! Reconciliation", SIGCOMM 2024), over the short item hashes of an exchange.
//!
//! Each side maps every item (its salted short hash `s`, `w` bytes) to an infinite sequence
//! of *coded symbol* indices: always index 0, then sparser and sparser (index `i` is hit
//! with probability about `1 / (1 + i/2)`). A coded symbol is the XOR of the items mapped to
//! it, the XOR of a 14-bit checksum of each, and their count modulo 4 (the last two share
//! two bytes). One side's symbols minus the other's (XOR, and the counts subtracted) are the
//! coding of the symmetric difference only (an item both hold cancels), which is peeled: a
//! symbol whose count is +1 or -1, whose checksum matches its sum *and* whose sum maps to
//! that index holds exactly one item, on the side the count's sign says; removing it from
//! every symbol it maps to makes others pure, and so on.
//! About 1.35-1.7 symbols per difference decode it, whatever the sets' sizes, and a prefix
//! too short is simply extended with the following symbols: nothing received is wasted.
//!
//! The sequence depends on `s` alone, so the decoder maps a decoded item without knowing
//! it, and the encoder of a window `[from, to)` needs no state: it is what a stateless
//! receiver sends.
//!
//! Hand-written rather than a crate: the exchange needs symbols of a caller-chosen width,
//! packed, encoded for an arbitrary window without state, and the index check below, which
//! the published implementations do not offer together.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Bytes of the checksum in each symbol.
pub const CHECK_BYTES: usize = 2;

/// One coded symbol: the XOR of its items' short hashes; the XOR of their checksums in the
/// top 14 bits of `check` and their count modulo 4 in the bottom two.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Symbol {
    pub sum: u64,
    pub check: u16,
}

const COUNT_MASK: u16 = 0b11;

impl Symbol {
    /// Adds (`sign` 1) or removes (`sign` 3, i.e. -1 modulo 4) one item.
    fn apply(&mut self, item: u64, sign: u16) {
        self.sum ^= item;
        let count = (self.check & COUNT_MASK).wrapping_add(sign) & COUNT_MASK;
        self.check = ((self.check ^ checksum(item)) & !COUNT_MASK) | count;
    }

    /// This symbol minus `other`'s (what only this side's items contribute, with count +1,
    /// and only the other's, with count -1).
    pub fn subtract(&mut self, other: &Symbol) {
        self.sum ^= other.sum;
        let count = (self.check & COUNT_MASK).wrapping_sub(other.check & COUNT_MASK) & COUNT_MASK;
        self.check = ((self.check ^ other.check) & !COUNT_MASK) | count;
    }

    fn count(&self) -> u16 {
        self.check & COUNT_MASK
    }

    fn is_empty(&self) -> bool {
        self.sum == 0 && self.check == 0
    }
}

/// The checksum of an item, in the top 14 bits.
fn checksum(item: u64) -> u16 {
    (xxh3_64_with_seed(&item.to_le_bytes(), 0x636f_6465_6463_6873) as u16) & !COUNT_MASK
}

/// The symbol indices an item maps to, increasing, from 0 (Yang et al.'s mapping: the gap
/// after index `i` is `ceil((i + 1.5) * (2^32 / sqrt(r) - 1))` for a fresh 64-bit random
/// `r`). IEEE square roots are exact, so both sides compute the same indices.
struct Mapping {
    state: u64,
    index: u64,
}

impl Mapping {
    fn new(item: u64) -> Self {
        Mapping {
            state: xxh3_64_with_seed(&item.to_le_bytes(), 0x6d61_7070_696e_6721) | 1,
            index: 0,
        }
    }

    fn advance(&mut self) {
        self.state = self.state.wrapping_mul(0xda94_2042_e4dd_58b5);
        let r = self.state as f64;
        let gap = ((self.index as f64 + 1.5) * ((1u64 << 32) as f64 / (r + 1.0).sqrt() - 1.0))
            .ceil()
            .max(1.0);
        // A huge gap (a tiny r) saturates: the item maps to nothing further.
        self.index = if gap >= u64::MAX as f64 {
            u64::MAX
        } else {
            self.index.saturating_add(gap as u64)
        };
    }
}

/// Adds `item` into the symbols of the window `[from, from + window.len())`.
pub fn encode_into(window: &mut [Symbol], from: u64, item: u64) {
    let to = from + window.len() as u64;
    let mut mapping = Mapping::new(item);
    while mapping.index < to {
        if mapping.index >= from {
            window[(mapping.index - from) as usize].apply(item, 1);
        }
        mapping.advance();
    }
}

/// Whether `item` maps to symbol `index`.
fn maps_to(item: u64, index: u64) -> bool {
    let mut mapping = Mapping::new(item);
    while mapping.index < index {
        mapping.advance();
    }
    mapping.index == index
}

/// An item found by peeling, and whether it is on the side the difference was taken from
/// (`ours`: count +1) or on the other (-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Decoded {
    pub item: u64,
    pub ours: bool,
}

/// Peels `difference` (one side's symbols `0..len` minus the other's, changed in place).
/// Returns the items of the symmetric difference when every symbol ends empty, `None` when
/// the prefix is too short (or a checksum lied); the caller then asks for more symbols.
pub fn peel(difference: &mut [Symbol], item_mask: u64) -> Option<Vec<Decoded>> {
    let len = difference.len() as u64;
    let mut decoded = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut candidates: Vec<usize> = (0..difference.len()).rev().collect();
    while let Some(at) = candidates.pop() {
        let symbol = difference[at];
        if !matches!(symbol.count(), 1 | 3)
            || symbol.sum & !item_mask != 0
            || checksum(symbol.sum) != symbol.check & !COUNT_MASK
            || !maps_to(symbol.sum, at as u64)
        {
            continue;
        }
        let item = symbol.sum;
        if !seen.insert(item) {
            // Decoded twice: a checksum collision corrupted the peeling.
            return None;
        }
        let sign = symbol.count();
        decoded.push(Decoded {
            item,
            ours: sign == 1,
        });
        // Removing the item: the opposite of its sign.
        let removal = 4 - sign;
        let mut mapping = Mapping::new(item);
        while mapping.index < len {
            let index = mapping.index as usize;
            difference[index].apply(item, removal);
            if !difference[index].is_empty() {
                candidates.push(index);
            }
            mapping.advance();
        }
    }
    difference.iter().all(Symbol::is_empty).then_some(decoded)
}

/// Bytes of one packed symbol with `item_bytes`-byte sums.
pub fn symbol_bytes(item_bytes: u8) -> usize {
    usize::from(item_bytes) + CHECK_BYTES
}

pub fn pack(out: &mut Vec<u8>, symbols: &[Symbol], item_bytes: u8) {
    out.reserve(symbols.len() * symbol_bytes(item_bytes));
    for symbol in symbols {
        out.extend_from_slice(&symbol.sum.to_le_bytes()[..usize::from(item_bytes)]);
        out.extend_from_slice(&symbol.check.to_le_bytes());
    }
}

/// The symbols of `packed`; `None` when its length is not a whole number of symbols.
pub fn unpack(packed: &[u8], item_bytes: u8) -> Option<Vec<Symbol>> {
    let size = symbol_bytes(item_bytes);
    if !packed.len().is_multiple_of(size) {
        return None;
    }
    let width = usize::from(item_bytes);
    Some(
        packed
            .chunks_exact(size)
            .map(|chunk| {
                let mut sum = [0u8; 8];
                sum[..width].copy_from_slice(&chunk[..width]);
                Symbol {
                    sum: u64::from_le_bytes(sum),
                    check: u16::from_le_bytes([chunk[width], chunk[width + 1]]),
                }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use std::collections::BTreeSet;

    fn encode(items: &[u64], len: usize) -> Vec<Symbol> {
        let mut symbols = vec![Symbol::default(); len];
        for &item in items {
            encode_into(&mut symbols, 0, item);
        }
        symbols
    }

    #[test]
    fn windows_concatenate_to_the_prefix() {
        let items: Vec<u64> = (1..500u64).map(|i| i * 0x9e37_79b9).collect();
        let whole = encode(&items, 300);
        let mut pieces = Vec::new();
        for (from, to) in [(0u64, 7u64), (7, 100), (100, 300)] {
            let mut window = vec![Symbol::default(); (to - from) as usize];
            for &item in &items {
                encode_into(&mut window, from, item);
            }
            pieces.extend(window);
        }
        assert_eq!(whole, pieces);
    }

    /// Differences of every size decode from a prefix of about 1.35-2 symbols each, and the
    /// decoded items are exactly the symmetric difference.
    #[test]
    fn decodes_the_symmetric_difference() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut symbols_per_difference = Vec::new();
        for differences in [1usize, 2, 3, 5, 10, 40, 200, 1000] {
            let shared: Vec<u64> = (0..2000).map(|_| rng.gen::<u32>() as u64).collect();
            let only_a: Vec<u64> = (0..differences / 2)
                .map(|_| rng.gen::<u32>() as u64)
                .collect();
            let only_b: Vec<u64> = (0..differences - differences / 2)
                .map(|_| rng.gen::<u32>() as u64)
                .collect();
            let a: Vec<u64> = shared.iter().chain(&only_a).copied().collect();
            let b: Vec<u64> = shared.iter().chain(&only_b).copied().collect();
            let expected: BTreeSet<Decoded> = only_a
                .iter()
                .map(|&item| Decoded { item, ours: true })
                .chain(only_b.iter().map(|&item| Decoded { item, ours: false }))
                .collect();
            let mut len = 1;
            let decoded = loop {
                let mut difference = encode(&a, len);
                for (d, s) in difference.iter_mut().zip(&encode(&b, len)) {
                    d.subtract(s);
                }
                if let Some(decoded) = peel(&mut difference, u32::MAX as u64) {
                    break decoded;
                }
                len += 1;
                assert!(len <= 4 * differences + 8, "{differences} never decoded");
            };
            assert_eq!(decoded.into_iter().collect::<BTreeSet<_>>(), expected);
            symbols_per_difference.push(len as f64 / differences as f64);
        }
        assert!(
            symbols_per_difference.iter().skip(5).all(|&r| r < 2.5),
            "{symbols_per_difference:?}"
        );
    }

    #[test]
    fn packing_round_trips() {
        let symbols = vec![
            Symbol {
                sum: 0xdead_beef,
                check: 7,
            },
            Symbol { sum: 1, check: 0 },
        ];
        let mut packed = Vec::new();
        pack(&mut packed, &symbols, 4);
        assert_eq!(packed.len(), 12);
        assert_eq!(unpack(&packed, 4), Some(symbols));
        assert_eq!(unpack(&packed[..11], 4), None);
    }
}
