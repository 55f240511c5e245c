//! Registration-number and taxpayer-number algorithms (reference/fiscal.md, "Registration numbers").
//!
//! A KKT refuses a registration whose RNM does not match its factory number and the user's INN, and a
//! receipt with a malformed INN is a tax error, so both checks live here where every part can reach them.

use thiserror::Error;

/// CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, no final xor). Used by the RNM check
/// and the OFD container; `crc`'s catalogue calls it `CRC_16_IBM_3740`.
pub const CRC16: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_IBM_3740);

/// Why an INN was refused. The caller names the field; this says what is wrong with the value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InnError {
    #[error("must be 10 digits (organisation) or 12 digits (individual), got {0} characters")]
    Length(usize),
    #[error("must contain digits only")]
    NotDigits,
    #[error("check digit does not match: the number is mistyped")]
    Checksum,
}

/// Checks the length and the check digits of an INN.
pub fn validate_inn(inn: &str) -> Result<(), InnError> {
    if !inn.bytes().all(|b| b.is_ascii_digit()) {
        return Err(InnError::NotDigits);
    }
    let d: Vec<u32> = inn.bytes().map(|b| u32::from(b - b'0')).collect();
    let check = |digits: &[u32], weights: &[u32]| -> u32 {
        let sum: u32 = digits.iter().zip(weights).map(|(a, b)| a * b).sum();
        (sum % 11) % 10
    };
    match d.len() {
        10 => {
            if check(&d[..9], &[2, 4, 10, 3, 5, 9, 4, 6, 8]) != d[9] {
                return Err(InnError::Checksum);
            }
        }
        12 => {
            let w11 = [7, 2, 4, 10, 3, 5, 9, 4, 6, 8];
            let w12 = [3, 7, 2, 4, 10, 3, 5, 9, 4, 6, 8];
            if check(&d[..10], &w11) != d[10] || check(&d[..11], &w12) != d[11] {
                return Err(InnError::Checksum);
            }
        }
        n => return Err(InnError::Length(n)),
    }
    Ok(())
}

/// Why an RNM could not be computed or did not match.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RnmError {
    #[error("RNM must be 16 digits, got {0:?}")]
    Shape(String),
    #[error("RNM sequence must be 10 digits, got {0:?}")]
    Sequence(String),
    #[error("INN {0:?} is longer than 12 characters")]
    Inn(String),
    #[error("factory number {0:?} is longer than 20 characters")]
    FactoryNumber(String),
    #[error("RNM {rnm} does not belong to factory number {zn} and INN {inn}: check all three against the registration card")]
    Mismatch {
        rnm: String,
        zn: String,
        inn: String,
    },
}

/// Builds the 16-digit RNM from the 10-digit sequence the tax service issued, the user's INN and the
/// KKT's factory number (ZN).
pub fn rnm(sequence: &str, inn: &str, zn: &str) -> Result<String, RnmError> {
    if sequence.len() != 10 || !sequence.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RnmError::Sequence(sequence.to_owned()));
    }
    if inn.len() > 12 {
        return Err(RnmError::Inn(inn.to_owned()));
    }
    if zn.len() > 20 {
        return Err(RnmError::FactoryNumber(zn.to_owned()));
    }
    let input = format!("{sequence}{inn:0>12}{zn:0>20}");
    Ok(format!("{sequence}{:06}", CRC16.checksum(input.as_bytes())))
}

/// Checks that `rnm` was issued for this ZN and INN — what the KKT does before it accepts a
/// registration.
pub fn check_rnm(rnm_value: &str, inn: &str, zn: &str) -> Result<(), RnmError> {
    let rnm_value = rnm_value.trim_end();
    if rnm_value.len() != 16 || !rnm_value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RnmError::Shape(rnm_value.to_owned()));
    }
    let expected = rnm(&rnm_value[..10], inn.trim_end(), zn.trim_end())?;
    if expected == rnm_value {
        Ok(())
    } else {
        Err(RnmError::Mismatch {
            rnm: rnm_value.to_owned(),
            zn: zn.to_owned(),
            inn: inn.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rnm_vector_from_shared_vectors() {
        // ../shared/vectors/ofd-container.json, "rnm".
        assert_eq!(
            rnm("0149060006", "504404744207", "0149060006000651").as_deref(),
            Ok("0149060006035849")
        );
        assert_eq!(
            check_rnm("0149060006035849", "504404744207", "0149060006000651"),
            Ok(())
        );
        assert!(matches!(
            check_rnm("0149060006035848", "504404744207", "0149060006000651"),
            Err(RnmError::Mismatch { .. })
        ));
        assert!(matches!(
            check_rnm("0149060006035849", "504404744207", "0149060006000652"),
            Err(RnmError::Mismatch { .. })
        ));
    }

    #[test]
    fn inn_checksums() {
        assert_eq!(validate_inn("3245001416"), Ok(()));
        assert_eq!(validate_inn("7707083893"), Ok(()));
        assert_eq!(validate_inn("504404744207"), Ok(()));
        assert_eq!(validate_inn("112233445566"), Err(InnError::Checksum));
        assert_eq!(validate_inn("3245001417"), Err(InnError::Checksum));
        assert_eq!(validate_inn("324500141"), Err(InnError::Length(9)));
        assert_eq!(validate_inn("32450014a6"), Err(InnError::NotDigits));
        assert_eq!(validate_inn(""), Err(InnError::Length(0)));
    }

    #[test]
    fn every_single_digit_typo_in_a_10_digit_inn_is_caught_or_lands_on_a_valid_inn() {
        // The mod-11 check catches every single-digit error except those that hit the 10→0 fold.
        let good = "7707083893";
        let mut caught = 0;
        for pos in 0..10 {
            for digit in b'0'..=b'9' {
                let mut s = good.as_bytes().to_vec();
                if s[pos] == digit {
                    continue;
                }
                s[pos] = digit;
                if validate_inn(std::str::from_utf8(&s).unwrap_or_default()).is_err() {
                    caught += 1;
                }
            }
        }
        assert!(caught >= 80, "caught only {caught} of 90 typos");
    }
}
