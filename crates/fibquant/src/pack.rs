//! Bit-packing of codeword indices: `bits` per index (1..=16), little-endian bit order.

/// Bytes needed for `count` indices of `bits` bits.
pub fn packed_len(count: usize, bits: u32) -> usize {
    (count * bits as usize).div_ceil(8)
}

/// Packs `indices` (each < 2^bits) into `out` (`packed_len` bytes, every byte written).
pub fn pack(indices: &[u16], bits: u32, out: &mut [u8]) {
    if bits == 8 {
        out.iter_mut().zip(indices).for_each(|(o, i)| *o = *i as u8);
        return;
    }
    // a bit accumulator, flushed a byte at a time
    let (mut acc, mut held) = (0u64, 0u32);
    let mut bytes = out.iter_mut();
    for &idx in indices {
        acc |= (idx as u64) << held;
        held += bits;
        while held >= 8 {
            if let Some(b) = bytes.next() {
                *b = acc as u8;
            }
            acc >>= 8;
            held -= 8;
        }
    }
    if held > 0 {
        if let Some(b) = bytes.next() {
            *b = acc as u8;
        }
    }
}

/// Unpacks `out.len()` indices of `bits` bits from `bytes` (`packed_len` bytes).
pub fn unpack(bytes: &[u8], bits: u32, out: &mut [u16]) {
    if bits == 8 {
        out.iter_mut().zip(bytes).for_each(|(o, b)| *o = *b as u16);
        return;
    }
    let mask = (1u64 << bits) - 1;
    let (mut acc, mut held) = (0u64, 0u32);
    let mut next = bytes.iter();
    for idx in out.iter_mut() {
        while held < bits {
            acc |= (*next.next().unwrap_or(&0) as u64) << held;
            held += 8;
        }
        *idx = (acc & mask) as u16;
        acc >>= bits;
        held -= bits;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_width() {
        // counts whose packing is shorter than one 8-byte window, and longer
        for (bits, count) in (1..=16u32).flat_map(|b| [1usize, 2, 3, 5, 37].map(|c| (b, c))) {
            let indices: Vec<u16> = (0..count as u32)
                .map(|i| ((i * 2_654_435_761u32) >> 7) as u16 & ((1u32 << bits) - 1) as u16)
                .collect();
            let mut bytes = vec![0u8; packed_len(indices.len(), bits)];
            pack(&indices, bits, &mut bytes);
            let mut back = vec![0u16; indices.len()];
            unpack(&bytes, bits, &mut back);
            assert_eq!(back, indices, "{bits} bits, {count} indices");
            // past the end reads as zero bits, never out of bounds
            let mut longer = vec![0u16; indices.len() + 3];
            unpack(&bytes, bits, &mut longer);
            assert_eq!(&longer[..indices.len()], &indices[..], "{bits} bits");
            assert_eq!(&longer[indices.len()..], &[0, 0, 0], "{bits} bits");
        }
    }
}
