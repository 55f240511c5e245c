//! Byte-level vectors from outside the project (`../shared/vectors/`). These are the ground truth:
//! if one fails, the codec is wrong, not the vector.

use protocol::container::{Container, SessionHeader};
use protocol::document::{Document, RegistrationReport};
use protocol::tlv::Value;
use serde_json::Value as Json;

fn vectors() -> Json {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/vectors/ofd-container.json"
    );
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{path}: {e} — the shared vectors must sit beside the repo"));
    serde_json::from_str(&text).expect("vector file is JSON")
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn s<'a>(v: &'a Json, path: &[&str]) -> &'a str {
    path.iter()
        .fold(v, |v, k| &v[*k])
        .as_str()
        .unwrap_or_else(|| panic!("{path:?} is a string"))
}

fn n(v: &Json, path: &[&str]) -> u64 {
    path.iter()
        .fold(v, |v, k| &v[*k])
        .as_u64()
        .unwrap_or_else(|| panic!("{path:?} is a number"))
}

#[test]
fn session_header_reproduces_byte_for_byte() {
    let v = vectors();
    let bytes = hex(s(&v, &["session_header", "hex"]));
    let h = SessionHeader::decode(&bytes).expect("decodes");
    assert_eq!(h.app_version, [0x00, 0x01]);
    assert_eq!(
        format!("{:<16}", h.fn_number),
        s(&v, &["session_header", "fields", "fn_number"])
    );
    assert_eq!(
        u64::from(h.container_length),
        n(&v, &["session_header", "fields", "container_length"])
    );
    assert_eq!(
        u64::from(h.flags),
        n(&v, &["session_header", "fields", "flags"])
    );
    assert_eq!(
        u64::from(h.crc),
        n(&v, &["session_header", "fields", "crc"])
    );
    assert_eq!(h.encode().to_vec(), bytes);
}

#[test]
fn container_reproduces_byte_for_byte_with_crc() {
    let v = vectors();
    let c = &v["container"];
    let mut bytes = hex(s(c, &["header_hex"]));
    bytes.extend(hex(s(c, &["body_hex"])));
    let decoded = Container::decode(&bytes).expect("decodes with a valid CRC");
    let f = &c["fields"];
    assert_eq!(bytes.len() as u64, n(f, &["length"]));
    assert_eq!(
        u64::from(u16::from_le_bytes([bytes[2], bytes[3]])),
        n(f, &["crc"])
    );
    assert_eq!(
        u64::from(decoded.header.document_type),
        n(f, &["document_type"])
    );
    assert_eq!(u64::from(decoded.header.version), n(f, &["version"]));
    assert_eq!(
        decoded.header.service_data_1.to_vec(),
        hex(s(f, &["service_data_1_hex"]))
    );
    assert_eq!(decoded.header.fn_number, s(f, &["fn_number"]));
    assert_eq!(u64::from(decoded.header.fd_number), n(f, &["fd_number"]));
    assert_eq!(
        decoded.header.service_data_2.to_vec(),
        hex(s(f, &["service_data_2_hex"]))
    );
    assert_eq!(
        decoded.encode().expect("encodes"),
        bytes,
        "re-encoding changed bytes"
    );

    // A single flipped bit anywhere but the CRC field is caught.
    for i in (0..bytes.len()).filter(|i| *i != 2 && *i != 3) {
        let mut damaged = bytes.clone();
        damaged[i] ^= 0x10;
        assert!(
            Container::decode(&damaged).is_err(),
            "flip at {i} went unnoticed"
        );
    }
}

#[test]
fn registration_report_fields_decode_as_the_vector_says() {
    let v = vectors();
    let c = &v["container"];
    let mut bytes = hex(s(c, &["header_hex"]));
    bytes.extend(hex(s(c, &["body_hex"])));
    let container = Container::decode(&bytes).expect("decodes");
    let doc = container.parse_document().expect("document parses");
    assert_eq!(doc.encode().expect("encodes"), container.document);
    let d = &c["body_decoded"];
    let field = |tag: u16| {
        doc.fields
            .iter()
            .find(|f| f.tag == tag)
            .map(|f| f.value.clone())
            .unwrap_or_else(|| panic!("tag {tag} present"))
    };
    let text = |tag: u16| match field(tag) {
        Value::String(s) => s,
        other => panic!("tag {tag} is a string, got {other:?}"),
    };
    assert_eq!(text(1041), s(d, &["1041_fn_number"]));
    assert_eq!(text(1037), s(d, &["1037_rnm"]));
    assert_eq!(text(1018), s(d, &["1018_user_inn"]));
    assert_eq!(text(1048), s(d, &["1048_user_name"]));
    assert_eq!(text(1046), s(d, &["1046_ofd_name"]));
    assert_eq!(text(1060), s(d, &["1060_fns_site"]));
    assert_eq!(text(1061), s(d, &["1061_ofd_site"]));
    assert_eq!(text(1021), s(d, &["1021_cashier"]));
    assert_eq!(text(1013), s(d, &["1013_zn"]));
    assert_eq!(field(1040), Value::U32(n(d, &["1040_fd_number"]) as u32));
    assert_eq!(
        field(1012),
        Value::UnixTime(n(d, &["1012_datetime_unix"]) as u32)
    );
    for (tag, key) in [
        (1001, "1001"),
        (1002, "1002"),
        (1056, "1056"),
        (1062, "1062"),
    ] {
        assert_eq!(field(tag), Value::Byte(n(d, &[key]) as u8), "tag {tag}");
    }
    assert_eq!(field(1077), Value::Bytes(hex(s(d, &["1077_fpd_hex"]))));
    assert_eq!(
        u64::from(doc.fpd().expect("has FPD").printed()),
        n(d, &["fpd_printed"])
    );

    // The typed view reads the same document.
    let typed = RegistrationReport::from_document(&doc).expect("typed registration report");
    assert_eq!(typed.owner.user_inn, "112233445566");
    assert_eq!(typed.owner.rnm, "120000130000");
    assert_eq!(typed.seal.fn_number, "999907891234567");
    assert_eq!(typed.seal.fpd.printed(), 476_807_588);
    assert_eq!(typed.zn, "0620000001");
    assert_eq!(typed.taxation_systems, 1);
    assert_eq!(typed.cashier, "СИС. АДМИНИСТРАТОР");
}

#[test]
fn tlv_values() {
    let v = vectors();
    let t = &v["tlv_values"];
    let doc = Document::decode(&[
        0x03, 0x00, 24, 0, // receipt STLV, 24 bytes
        0x16, 0x04, 4, 0, 0x92, 0xA5, 0xE1, 0xE2, // 1046
        0xF4, 0x03, 4, 0, 0x8A, 0x02, 0x9E, 0x55, // 1012
        0xFC, 0x03, 3, 0, 0xE9, 0x2D, 0x06, 0x00,
    ]);
    // The last TLV above is deliberately one byte short of its STLV length: a decoder must refuse it.
    assert!(doc.is_err());
    let fields = protocol::tlv::decode(&[
        0x16, 0x04, 4, 0, 0x92, 0xA5, 0xE1, 0xE2, // 1046 (string)
        0xF4, 0x03, 4, 0, 0x8A, 0x02, 0x9E, 0x55, // 1012
        0xFC, 0x03, 3, 0, 0xE9, 0x2D, 0x06, // 1020
        0xFF, 0x03, 5, 0, 0x02, 0x15, 0xCD, 0x5B, 0x07, // 1023
    ])
    .expect("decodes");
    assert_eq!(
        fields[0].value,
        Value::String(s(t, &["cp866_hex_92a5e1e2"]).into())
    );
    assert_eq!(
        fields[1].value,
        Value::UnixTime(n(t, &["unixtime_hex_8a029e55"]) as u32)
    );
    assert_eq!(fields[2].value, Value::Vln(n(t, &["vln_hex_e92d06"])));
    let Value::Fvln { decimals, mantissa } = fields[3].value else {
        panic!("FVLN")
    };
    let printed = format!(
        "{}.{:0width$}",
        mantissa / 10u64.pow(u32::from(decimals)),
        mantissa % 10u64.pow(u32::from(decimals)),
        width = usize::from(decimals)
    );
    assert_eq!(printed, s(t, &["fvln_hex_0215cd5b07"]));
}
