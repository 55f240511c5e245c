//! FFD TLV codec: `tag: u16 LE, length: u16 LE, value`.
//!
//! A fiscal document is one STLV whose tag is the document type. The wire does not say how to read a
//! value; the tag does, through the FFD dictionary in [`tag_kind`]. Tags the dictionary does not know
//! decode as raw bytes so that a document from a newer FFD still round-trips unchanged.
//!
//! Strings travel in CP866. A string that cannot be written in CP866 is refused at encode time rather
//! than silently replaced: a fiscal document must say exactly what the receipt said.

use thiserror::Error;

/// How the value of a tag is encoded (FFD value types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagKind {
    Byte,
    U32,
    /// Unsigned LE integer with the high zero bytes trimmed (money in kopecks), ≤ 8 bytes.
    Vln,
    /// First byte = number of decimal places, then a VLN mantissa.
    Fvln,
    /// CP866 string.
    String,
    /// Seconds since the epoch, u32 LE.
    UnixTime,
    /// Nested TLVs.
    Stlv,
    Bytes,
}

/// The FFD dictionary for the tags this product writes or reads.
pub fn tag_kind(tag: u16) -> TagKind {
    use TagKind::*;
    match tag {
        // Document types are STLVs.
        1 | 11 | 2 | 21 | 3 | 31 | 4 | 41 | 5 | 6 | 7 => Stlv,
        1059 | 1068 | 1174 | 1084 | 1224 | 1223 => Stlv,
        1001 | 1002 | 1056 | 1057 | 1062 | 1108 | 1109 | 1110 | 1126 | 1193 | 1207 | 1221
        | 1054 | 1055 | 1101 | 1199 | 1212 | 1214 | 1209 | 1189 | 1190 | 1022 | 1050 | 1051
        | 1052 | 1053 | 1173 | 2108 => Byte,
        1040 | 1038 | 1042 | 1097 | 1116 | 1111 | 1118 | 1213 | 1205 => U32,
        1020 | 1031 | 1081 | 1043 | 1079 | 1215 | 1216 | 1217 | 1102 | 1103 | 1104 | 1105
        | 1106 | 1107 | 1200 => Vln,
        1023 => Fvln,
        1012 | 1098 | 1178 => UnixTime,
        1041 | 1037 | 1018 | 1048 | 1046 | 1060 | 1061 | 1021 | 1013 | 1009 | 1187 | 1008
        | 1017 | 1030 | 1117 | 1203 | 1179 | 1177 | 1227 | 1228 | 1188 | 1192 | 1085 | 1086 => {
            String
        }
        _ => Bytes,
    }
}

/// A decoded TLV value. The variant follows [`tag_kind`] of the tag it sits under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Byte(u8),
    U32(u32),
    Vln(u64),
    Fvln { decimals: u8, mantissa: u64 },
    String(String),
    UnixTime(u32),
    Stlv(Vec<Field>),
    Bytes(Vec<u8>),
}

/// One TLV: a tag and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub tag: u16,
    pub value: Value,
}

impl Field {
    pub fn new(tag: u16, value: Value) -> Self {
        Field { tag, value }
    }
}

/// Why bytes could not be read as TLV.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("truncated TLV at offset {offset}: need {need} bytes, {have} left")]
    Truncated {
        offset: usize,
        need: usize,
        have: usize,
    },
    #[error("tag {tag}: {kind:?} value cannot be {len} bytes long")]
    BadLength { tag: u16, kind: TagKind, len: usize },
    #[error("tag {tag}: FVLN with {decimals} decimal places is out of range")]
    BadDecimals { tag: u16, decimals: u8 },
    #[error("nesting deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// Why a value could not be written as TLV.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    #[error("tag {tag}: character {ch:?} cannot be written in CP866; use Cyrillic or Latin text")]
    NotCp866 { tag: u16, ch: char },
    #[error("tag {tag}: value is {len} bytes, a TLV holds at most 65535")]
    TooLong { tag: u16, len: usize },
    #[error("tag {tag}: FVLN with {decimals} decimal places is out of range")]
    BadDecimals { tag: u16, decimals: u8 },
}

/// Deep documents come only from hostile input; real ones nest two or three levels.
pub const MAX_DEPTH: usize = 8;

/// Largest number of decimal places an FVLN may carry and still fit a u64 mantissa meaningfully.
pub const MAX_FVLN_DECIMALS: u8 = 19;

/// Encodes a sequence of fields.
pub fn encode(fields: &[Field]) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    for f in fields {
        encode_field(f, &mut out)?;
    }
    Ok(out)
}

/// Encodes one field, appending to `out`.
pub fn encode_field(field: &Field, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let tag = field.tag;
    let value: Vec<u8> = match &field.value {
        Value::Byte(b) => vec![*b],
        Value::U32(v) | Value::UnixTime(v) => v.to_le_bytes().to_vec(),
        Value::Vln(v) => vln_bytes(*v),
        Value::Fvln { decimals, mantissa } => {
            if *decimals > MAX_FVLN_DECIMALS {
                return Err(EncodeError::BadDecimals {
                    tag,
                    decimals: *decimals,
                });
            }
            let mut v = vec![*decimals];
            v.extend(vln_bytes(*mantissa));
            v
        }
        Value::String(s) => cp866_encode(tag, s)?,
        Value::Stlv(children) => encode(children)?,
        Value::Bytes(b) => b.clone(),
    };
    let len = u16::try_from(value.len()).map_err(|_| EncodeError::TooLong {
        tag,
        len: value.len(),
    })?;
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&value);
    Ok(())
}

/// Decodes a sequence of fields that must fill `bytes` exactly.
pub fn decode(bytes: &[u8]) -> Result<Vec<Field>, DecodeError> {
    decode_at(bytes, 0, 0)
}

fn decode_at(bytes: &[u8], base: usize, depth: usize) -> Result<Vec<Field>, DecodeError> {
    if depth > MAX_DEPTH {
        return Err(DecodeError::TooDeep);
    }
    let mut fields = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let have = bytes.len() - pos;
        if have < 4 {
            return Err(DecodeError::Truncated {
                offset: base + pos,
                need: 4,
                have,
            });
        }
        let tag = u16::from_le_bytes([bytes[pos], bytes[pos + 1]]);
        let len = usize::from(u16::from_le_bytes([bytes[pos + 2], bytes[pos + 3]]));
        let start = pos + 4;
        if bytes.len() - start < len {
            return Err(DecodeError::Truncated {
                offset: base + start,
                need: len,
                have: bytes.len() - start,
            });
        }
        let raw = &bytes[start..start + len];
        let value = decode_value(tag, raw, base + start, depth)?;
        fields.push(Field { tag, value });
        pos = start + len;
    }
    Ok(fields)
}

fn decode_value(tag: u16, raw: &[u8], offset: usize, depth: usize) -> Result<Value, DecodeError> {
    let kind = tag_kind(tag);
    let bad = || DecodeError::BadLength {
        tag,
        kind,
        len: raw.len(),
    };
    Ok(match kind {
        TagKind::Byte => match raw {
            [b] => Value::Byte(*b),
            _ => return Err(bad()),
        },
        TagKind::U32 | TagKind::UnixTime => {
            let arr: [u8; 4] = raw.try_into().map_err(|_| bad())?;
            let v = u32::from_le_bytes(arr);
            if kind == TagKind::U32 {
                Value::U32(v)
            } else {
                Value::UnixTime(v)
            }
        }
        TagKind::Vln => Value::Vln(vln_value(raw).ok_or_else(bad)?),
        TagKind::Fvln => {
            let (&decimals, rest) = raw.split_first().ok_or_else(bad)?;
            if decimals > MAX_FVLN_DECIMALS {
                return Err(DecodeError::BadDecimals { tag, decimals });
            }
            Value::Fvln {
                decimals,
                mantissa: vln_value(rest).ok_or_else(bad)?,
            }
        }
        TagKind::String => Value::String(cp866_decode(raw)),
        TagKind::Stlv => Value::Stlv(decode_at(raw, offset, depth + 1)?),
        TagKind::Bytes => Value::Bytes(raw.to_vec()),
    })
}

/// VLN bytes: little-endian, high zero bytes trimmed; zero is one zero byte so that readers which
/// expect a non-empty value accept it.
fn vln_bytes(v: u64) -> Vec<u8> {
    let bytes = v.to_le_bytes();
    let used = 8 - (v.leading_zeros() as usize / 8);
    bytes[..used.max(1)].to_vec()
}

fn vln_value(raw: &[u8]) -> Option<u64> {
    if raw.is_empty() || raw.len() > 8 {
        return None;
    }
    let mut buf = [0u8; 8];
    buf[..raw.len()].copy_from_slice(raw);
    Some(u64::from_le_bytes(buf))
}

/// Encodes text in CP866, refusing characters CP866 cannot hold.
pub fn cp866_encode(tag: u16, s: &str) -> Result<Vec<u8>, EncodeError> {
    // encoding_rs only decodes IBM866 through its single-byte table; encoding goes through the same
    // table so that what we write is exactly what a reader will see.
    let (bytes, _, had_errors) = encoding_rs::IBM866.encode(s);
    if had_errors {
        let ch = s
            .chars()
            .find(|c| {
                let mut buf = [0u8; 4];
                encoding_rs::IBM866.encode(c.encode_utf8(&mut buf)).2
            })
            .unwrap_or('\u{FFFD}');
        return Err(EncodeError::NotCp866 { tag, ch });
    }
    Ok(bytes.into_owned())
}

/// Decodes CP866; every byte maps to a character, so this cannot fail.
pub fn cp866_decode(raw: &[u8]) -> String {
    encoding_rs::IBM866
        .decode_without_bom_handling(raw)
        .0
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap_or(0))
            .collect()
    }

    #[test]
    fn reference_value_vectors() {
        // reference/fiscal.md and vectors/ofd-container.json, "tlv_values".
        assert_eq!(cp866_decode(&hex("92a5e1e2")), "Тест");
        assert_eq!(cp866_encode(1030, "Тест"), Ok(hex("92a5e1e2")));
        let t = decode(&[0xF4, 0x03, 4, 0, 0x8A, 0x02, 0x9E, 0x55]);
        assert_eq!(
            t,
            Ok(vec![Field::new(1012, Value::UnixTime(1_436_418_698))])
        );
        let v = decode(&[0xFC, 0x03, 3, 0, 0xE9, 0x2D, 0x06]);
        assert_eq!(v, Ok(vec![Field::new(1020, Value::Vln(404_969))]));
        let f = decode(&[0xFF, 0x03, 5, 0, 0x02, 0x15, 0xCD, 0x5B, 0x07]);
        assert_eq!(
            f,
            Ok(vec![Field::new(
                1023,
                Value::Fvln {
                    decimals: 2,
                    mantissa: 123_456_789
                }
            )])
        );
        assert_eq!(vln_bytes(404_969), hex("e92d06"));
        assert_eq!(vln_bytes(0), vec![0]);
    }

    #[test]
    fn refuses_what_cp866_cannot_hold() {
        assert_eq!(
            encode(&[Field::new(1030, Value::String("Чай ☕".into()))]),
            Err(EncodeError::NotCp866 {
                tag: 1030,
                ch: '☕'
            })
        );
    }

    #[test]
    fn truncated_and_mis_sized_values_are_errors() {
        assert!(matches!(
            decode(&[1, 0, 5]),
            Err(DecodeError::Truncated { .. })
        ));
        assert!(matches!(
            decode(&[0x10, 0x04, 2, 0, 1, 2]),
            Err(DecodeError::BadLength { tag: 1040, .. })
        ));
        assert!(matches!(
            decode(&[0xFC, 0x03, 9, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
            Err(DecodeError::BadLength { tag: 1020, .. })
        ));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut f = Field::new(1030, Value::String("x".into()));
        for _ in 0..20 {
            f = Field::new(1059, Value::Stlv(vec![f]));
        }
        let bytes = encode(&[f]).unwrap_or_default();
        assert_eq!(decode(&bytes), Err(DecodeError::TooDeep));
    }
}
