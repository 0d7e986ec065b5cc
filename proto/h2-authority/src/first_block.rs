//! Fast path for the connection's first header block: decide "passthrough" without a full
//! HPACK decode.
//!
//! Almost every connection's first block has a parseable (or no) `:authority`, and then the
//! adapter only forwards it. Decoding it fully with `loona_hpack` costs a Huffman table build
//! (a 257-entry HashMap) per Huffman-coded string, ~120 µs per connection in a profile. This
//! scanner walks the RFC 7541 field representations and decodes nothing but `:authority`
//! values (with one Huffman decoder per thread, built once).
//!
//! It answers [`Verdict::Passthrough`] only when the full decoder would also pass the block
//! through; anything else (a bad authority, a size update, an index past the static table,
//! truncation, an estimated header list near the limit) is [`Verdict::SlowPath`]: the caller
//! then runs today's full decode, which gives the exact current behaviour and errors.
//! The first block is decoded against an empty dynamic table, so any index above 61 means an
//! entry the block itself inserted; rather than model the table, such blocks take the slow path.
//!
//! One difference is accepted: strings other than `:authority` are not decoded, so an invalid
//! Huffman string in another field of a block that is passed through is reported by h2 (a
//! COMPRESSION_ERROR connection error) instead of the adapter (an `io::Error`). The connection
//! fails either way.

use std::cell::RefCell;

use http::uri::Authority;
use loona_hpack::huffman::HuffmanDecoder;

thread_local! {
    /// loona's Huffman decoder builds its code HashMap in `new` (the cost this module avoids);
    /// `decode` keeps no state between calls, so one per thread is reused for every connection.
    static HUFFMAN: RefCell<Option<HuffmanDecoder>> = const { RefCell::new(None) };
}

/// Huffman-decodes `raw` with the thread's shared decoder; `None` if it is not valid Huffman
/// (or, which cannot happen, the decoder is already borrowed).
fn huffman_decode(raw: &[u8]) -> Option<Vec<u8>> {
    HUFFMAN.with(|cell| {
        let mut slot = cell.try_borrow_mut().ok()?;
        slot.get_or_insert_with(HuffmanDecoder::new)
            .decode(raw)
            .ok()
    })
}

/// What to do with the first header block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Well-formed as scanned, within the list-size limit, every `:authority` parses.
    Passthrough,
    /// Use the full decoder (exact current behaviour).
    SlowPath,
}

/// `:authority` Huffman-coded (RFC 7541, Appendix B) with its EOS padding. Huffman codes are
/// prefix-free and valid padding is unique, so this is the only valid Huffman encoding of it.
const HUFFMAN_AUTHORITY: &[u8] = &[0xb8, 0x3b, 0x53, 0x39, 0xec, 0x32, 0x7d, 0x7f];
const AUTHORITY: &[u8] = b":authority";
/// The shortest Huffman code is 5 bits: a Huffman string of n octets decodes to at most 8n/5.
const HUFFMAN_MAX_EXPANSION_NUM: usize = 8;
const HUFFMAN_MAX_EXPANSION_DEN: usize = 5;
/// Integers longer than this (prefix octet plus three continuation octets, values up to ~2^21)
/// are left to the full decoder; block lengths never need more (blocks are at most 1 MiB).
const MAX_INTEGER_OCTETS: usize = 4;

/// The HPACK static table (RFC 7541, Appendix A), index 1 first.
pub(crate) const STATIC_TABLE: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// A string literal as it is on the wire.
struct WireString<'a> {
    huffman: bool,
    raw: &'a [u8],
}

impl WireString<'_> {
    /// An upper bound of the decoded length (exact for non-Huffman strings).
    fn max_len(&self) -> usize {
        if self.huffman {
            self.raw.len().saturating_mul(HUFFMAN_MAX_EXPANSION_NUM) / HUFFMAN_MAX_EXPANSION_DEN
        } else {
            self.raw.len()
        }
    }
}

/// Scans the connection's first header block (the complete HPACK fragment). `max_list_bytes`
/// is the decoded header-list limit (RFC 7541 size: name + value + `field_overhead` per field)
/// that the full decoder enforces; the scanner stays under it using upper bounds.
pub(crate) fn scan(block: &[u8], max_list_bytes: usize, field_overhead: usize) -> Verdict {
    match scan_inner(block, max_list_bytes, field_overhead) {
        Some(()) => Verdict::Passthrough,
        None => Verdict::SlowPath,
    }
}

/// `None` means "take the slow path".
fn scan_inner(block: &[u8], max_list_bytes: usize, field_overhead: usize) -> Option<()> {
    let mut rest = block;
    let mut list_bytes = 0usize;
    while let Some(&first) = rest.first() {
        let (name_is_authority, name_len, value) = if first & 0x80 != 0 {
            // Indexed field (section 6.1).
            let (index, used) = integer(rest, 7)?;
            rest = rest.get(used..)?;
            let &(name, value) = static_entry(index)?;
            (
                name == AUTHORITY,
                name.len(),
                WireString {
                    huffman: false,
                    raw: value,
                },
            )
        } else if first & 0xe0 == 0x20 {
            // Dynamic table size update (section 6.3): leave to the full decoder.
            return None;
        } else {
            // Literal with incremental indexing (01), without indexing (0000), never indexed
            // (0001) (section 6.2).
            let prefix = if first & 0x40 != 0 { 6 } else { 4 };
            let (index, used) = integer(rest, prefix)?;
            rest = rest.get(used..)?;
            let (is_authority, name_len) = if index == 0 {
                let (name, used) = string(rest)?;
                rest = rest.get(used..)?;
                let expected = if name.huffman {
                    HUFFMAN_AUTHORITY
                } else {
                    AUTHORITY
                };
                (name.raw == expected, name.max_len())
            } else {
                let &(name, _) = static_entry(index)?;
                (name == AUTHORITY, name.len())
            };
            let (value, used) = string(rest)?;
            rest = rest.get(used..)?;
            (is_authority, name_len, value)
        };
        list_bytes = list_bytes
            .checked_add(name_len)?
            .checked_add(value.max_len())?
            .checked_add(field_overhead)?;
        if list_bytes > max_list_bytes {
            return None;
        }
        if name_is_authority {
            // Judged exactly as the full path (and h2) does.
            let parses = if value.huffman {
                let decoded = huffman_decode(value.raw)?;
                Authority::try_from(decoded.as_slice()).is_ok()
            } else {
                Authority::try_from(value.raw).is_ok()
            };
            if !parses {
                return None;
            }
        }
    }
    Some(())
}

/// Static table entry `index` (1-based); `None` for 0 and dynamic-table indexes.
fn static_entry(index: usize) -> Option<&'static (&'static [u8], &'static [u8])> {
    STATIC_TABLE.get(index.checked_sub(1)?)
}

/// An HPACK integer with an N-bit prefix (RFC 7541, section 5.1): (value, octets used).
fn integer(buf: &[u8], prefix_bits: u32) -> Option<(usize, usize)> {
    let mask = (1u8 << prefix_bits) - 1;
    let mut value = usize::from(buf.first()? & mask);
    if value < usize::from(mask) {
        return Some((value, 1));
    }
    let mut shift = 0u32;
    for (k, &b) in buf.iter().enumerate().skip(1).take(MAX_INTEGER_OCTETS - 1) {
        value += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Some((value, k + 1));
        }
    }
    None
}

/// A string literal (section 5.2), undecoded: (string, octets used).
fn string(buf: &[u8]) -> Option<(WireString<'_>, usize)> {
    let huffman = buf.first()? & 0x80 != 0;
    let (len, used) = integer(buf, 7)?;
    let end = used.checked_add(len)?;
    let raw = buf.get(used..end)?;
    Some((WireString { huffman, raw }, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    use loona_hpack::Decoder;

    #[test]
    fn static_table_matches_loona() {
        for (k, entry) in STATIC_TABLE.iter().enumerate() {
            let index = k + 1;
            let mut block = Vec::new();
            crate::put_integer(&mut block, index, 7, 0x80);
            let decoded = Decoder::new().decode(&block).unwrap();
            assert_eq!(decoded.len(), 1);
            assert_eq!(decoded[0].0, entry.0, "name of static entry {index}");
            assert_eq!(decoded[0].1, entry.1, "value of static entry {index}");
        }
        // And nothing past it: index 62 is the (empty) dynamic table.
        assert!(Decoder::new().decode(&[0x80 | 62]).is_err());
    }

    #[test]
    fn huffman_authority_name_decodes_to_authority() {
        let decoded = HuffmanDecoder::new().decode(HUFFMAN_AUTHORITY).unwrap();
        assert_eq!(decoded, AUTHORITY);
    }

    #[test]
    fn shared_huffman_decoder_keeps_no_state_between_strings() {
        for _ in 0..3 {
            assert_eq!(huffman_decode(HUFFMAN_AUTHORITY).unwrap(), AUTHORITY);
            // 8 bits of padding: invalid, and must not affect the next string.
            assert_eq!(huffman_decode(&[0xff]), None);
            // '0' (00000) then padding 000, which is not a prefix of EOS.
            assert_eq!(huffman_decode(&[0x00]), None);
            assert_eq!(huffman_decode(&[0x07]).unwrap(), b"0");
            assert_eq!(huffman_decode(&[]).unwrap(), b"");
        }
    }

    #[test]
    fn integers_match_rfc_7541_and_stop_early() {
        assert_eq!(integer(&[0x0a], 5), Some((10, 1))); // C.1.1
        assert_eq!(integer(&[0x1f, 0x9a, 0x0a], 5), Some((1337, 3))); // C.1.2
        assert_eq!(integer(&[0x2a], 8 - 1), Some((42, 1)));
        assert_eq!(integer(&[0x7f, 0x00], 7), Some((127, 2)));
        assert_eq!(
            integer(&[0x7f, 0xff, 0xff, 0x7f], 7),
            Some((127 + (1 << 21) - 1, 4))
        );
        // Truncated, empty, or longer than the scanner handles: slow path.
        assert_eq!(integer(&[0x7f, 0x80], 7), None);
        assert_eq!(integer(&[], 7), None);
        assert_eq!(integer(&[0x7f, 0x80, 0x80, 0x80, 0x01], 7), None);
    }

    #[test]
    fn huffman_length_bound_holds() {
        // Every octet value as a one-symbol string: the decoded length never exceeds the bound.
        let decoder = &mut HuffmanDecoder::new();
        let encoded = [0xb8, 0x3b, 0x53, 0x39, 0xec, 0x32, 0x7d, 0x7f];
        let s = WireString {
            huffman: true,
            raw: &encoded,
        };
        assert!(decoder.decode(&encoded).unwrap().len() <= s.max_len());
        // 5-bit codes only ('0' is 00000): 8 octets hold 12 symbols plus 4 padding bits.
        let zeros = [0u8, 0, 0, 0, 0, 0, 0, 0x0f];
        let s = WireString {
            huffman: true,
            raw: &zeros,
        };
        let decoded = decoder.decode(&zeros).unwrap();
        assert_eq!(decoded, b"000000000000");
        assert!(decoded.len() <= s.max_len());
    }
}
