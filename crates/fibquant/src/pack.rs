//! Bit-packing of codeword indices: `bits` per index (1..=16), little-endian bit order.

/// Bytes needed for `count` indices of `bits` bits.
pub fn packed_len(count: usize, bits: u32) -> usize {
    (count * bits as usize).div_ceil(8)
}

/// Packs `indices` (each < 2^bits) into `out` (`packed_len` bytes, zeroed here).
pub fn pack(indices: &[u16], bits: u32, out: &mut [u8]) {
    out.fill(0);
    let mut bit = 0usize;
    for &idx in indices {
        let mut value = idx as u32;
        let mut remaining = bits;
        while remaining > 0 {
            let (byte, offset) = (bit / 8, (bit % 8) as u32);
            let take = remaining.min(8 - offset);
            out[byte] |= ((value & ((1 << take) - 1)) << offset) as u8;
            value >>= take;
            remaining -= take;
            bit += take as usize;
        }
    }
}

/// Unpacks `out.len()` indices of `bits` bits from `bytes`.
pub fn unpack(bytes: &[u8], bits: u32, out: &mut [u16]) {
    let mut bit = 0usize;
    for idx in out.iter_mut() {
        let mut value = 0u32;
        let mut got = 0;
        while got < bits {
            let (byte, offset) = (bit / 8, (bit % 8) as u32);
            let take = (bits - got).min(8 - offset);
            value |= ((bytes[byte] as u32 >> offset) & ((1 << take) - 1)) << got;
            got += take;
            bit += take as usize;
        }
        *idx = value as u16;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_width() {
        for bits in 1..=16u32 {
            let indices: Vec<u16> = (0..37u32)
                .map(|i| ((i * 2_654_435_761u32) >> 7) as u16 & ((1u32 << bits) - 1) as u16)
                .collect();
            let mut bytes = vec![0u8; packed_len(indices.len(), bits)];
            pack(&indices, bits, &mut bytes);
            let mut back = vec![0u16; indices.len()];
            unpack(&bytes, bits, &mut back);
            assert_eq!(back, indices, "{bits} bits");
        }
    }
}
