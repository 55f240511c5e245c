//! The target bodies on their seeds and on simple mutations of them, on stable Rust:
//! `cargo test --manifest-path fuzz/Cargo.toml`. Not a fuzzer; it keeps the bodies and seeds honest.

use protocol_fuzz::{run, seeds, TARGETS};

#[test]
fn every_target_has_seeds_and_accepts_them() {
    for t in TARGETS {
        let s = seeds(t);
        assert!(!s.is_empty(), "{t}: no seeds");
        for input in &s {
            assert_eq!(run(t, input), Some(()));
        }
    }
}

#[test]
fn truncations_and_bit_flips_of_the_seeds_do_not_crash() {
    for t in TARGETS {
        for input in seeds(t) {
            for cut in 0..input.len().min(300) {
                run(t, &input[..cut]);
            }
            for i in 0..input.len().min(300) {
                for bit in [0x01u8, 0x80] {
                    let mut m = input.clone();
                    m[i] ^= bit;
                    run(t, &m);
                }
            }
        }
    }
}

/// Seeds that the protocol refuses would start the fuzzer in the shallow end.
#[test]
fn seeds_are_accepted_by_the_protocol() {
    use protocol::container::Container;
    use protocol::document::Document;
    use protocol::ferma;
    use protocol::tunnel::{decode_frame, frame_len, AgentMessage, ControllerMessage};

    for s in seeds("tlv").iter().take(4) {
        assert!(Document::decode(s).is_ok());
    }
    for s in seeds("container") {
        let container = match s[0] {
            0 => &s[1 + 30..],
            _ => &s[1..],
        };
        assert!(Container::decode(container).is_ok_and(|c| c.parse_document().is_ok()));
    }
    let frames = seeds("tunnel_frame");
    for (kind, stream) in frames.iter().take(2).enumerate() {
        let mut rest = &stream[1..];
        while !rest.is_empty() {
            let len = frame_len([rest[0], rest[1], rest[2], rest[3]]).unwrap_or(usize::MAX);
            let body = &rest[4..4 + len];
            let ok = match kind {
                0 => decode_frame::<AgentMessage>(body).is_ok(),
                _ => decode_frame::<ControllerMessage>(body).is_ok(),
            };
            assert!(ok);
            rest = &rest[4 + len..];
        }
    }
    let bodies = seeds("ferma_json");
    assert!(ferma::parse_create_receipt(&bodies[0]).is_ok());
    assert!(ferma::parse_create_receipt(&bodies[1]).is_ok());
    assert!(ferma::parse_status_request(&bodies[2]).is_ok());
    assert!(ferma::parse_status_request(&bodies[3]).is_ok());
    assert!(ferma::parse_list_request(&bodies[4]).is_ok());
    assert!(ferma::parse_list_request(&bodies[5]).is_ok());
    assert!(ferma::parse_credentials(&bodies[6]).is_ok());
    assert!(ferma::parse_credentials(&bodies[7]).is_ok());
}
