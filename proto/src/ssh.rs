//! SSH details both ends of a relayed SSH channel agree on, sans-IO:
//! terminal modes as carried in a session frame, and exit signals by name
//! and number.

/// Encodes terminal modes as RFC 4254 §8 does: opcode, then a big-endian
/// u32, ended by `TTY_OP_END` (0).
pub fn encode_modes(modes: &[(u8, u32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(modes.len() * 5 + 1);
    for &(op, v) in modes {
        if op == 0 || op >= 160 {
            continue;
        }
        out.push(op);
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.push(0);
    out
}

/// Decodes what [`encode_modes`] wrote. Parsing stops at `TTY_OP_END`, at an
/// opcode of 160 or more (whose argument format is undefined), or at a
/// truncated entry, as OpenSSH does.
pub fn decode_modes(bytes: &[u8]) -> Vec<(u8, u32)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while let Some((&op, tail)) = rest.split_first() {
        if op == 0 || op >= 160 || tail.len() < 4 {
            break;
        }
        out.push((op, u32::from_be_bytes([tail[0], tail[1], tail[2], tail[3]])));
        rest = &tail[4..];
    }
    out
}

/// Signal names as SSH sends them (no `SIG` prefix), with Linux numbers.
const SIGNALS: [(&str, i32); 13] = [
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("ABRT", 6),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
];

/// The number of an SSH signal name; 0 when it has none here.
pub fn signal_number(name: &str) -> i32 {
    SIGNALS
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(0, |(_, v)| *v)
}

/// The SSH name of a signal number.
pub fn signal_by_number(number: i32) -> Option<&'static str> {
    SIGNALS.iter().find(|(_, v)| *v == number).map(|(n, _)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_round_trip_and_stop_where_openssh_stops() {
        let modes = [(1u8, 3u32), (53, 1), (128, 38400)];
        assert_eq!(decode_modes(&encode_modes(&modes)), modes);
        assert_eq!(decode_modes(&[1, 0, 0]), vec![], "truncated");
        assert_eq!(
            decode_modes(&[1, 0, 0, 0, 3, 200, 1, 1, 1, 1]),
            vec![(1, 3)]
        );
        assert_eq!(encode_modes(&[(0, 5), (170, 1)]), vec![0]);
    }

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(signal_number("TERM"), 15);
        assert_eq!(signal_by_number(9), Some("KILL"));
        assert_eq!(signal_number("WINCH"), 0);
        assert_eq!(signal_by_number(0), None);
    }
}
