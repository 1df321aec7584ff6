//! What an SSH channel's bytes mean for the evidence, beside or instead of
//! the bytes themselves: SFTP operations, the files the legacy scp protocol
//! moves, and a port forward's byte counts.

use custody_proto::evidence::v1 as ev;
use custody_proto::scp::{self, Direction, Scp};
use custody_proto::sftp::{self, Sftp};

use crate::gateway::relay::Tap;

type Kinds = Result<Vec<ev::event::Kind>, String>;

fn sftp_event(op: sftp::Op) -> ev::event::Kind {
    ev::event::Kind::FileOp(ev::FileOp {
        protocol: "sftp".into(),
        op: op.op,
        path: op.path,
        target: op.target,
        flags: op.flags.into_iter().map(String::from).collect(),
        read: op.read,
        written: op.written,
        status: op.status,
    })
}

/// The SFTP subsystem, read both ways.
#[derive(Default)]
pub(super) struct SftpTap(Sftp);

impl Tap for SftpTap {
    fn input(&mut self, data: &[u8]) -> Kinds {
        self.0
            .from_client(data)
            .map(|()| vec![])
            .map_err(|e| format!("the SFTP stream cannot be followed: {e}"))
    }

    fn output(&mut self, data: &[u8]) -> Kinds {
        self.0
            .from_server(data)
            .map(|ops| ops.into_iter().map(sftp_event).collect())
            .map_err(|e| format!("the SFTP stream cannot be followed: {e}"))
    }

    fn finish(&mut self) -> Vec<ev::event::Kind> {
        self.0.finish().into_iter().map(sftp_event).collect()
    }
}

/// The remote end of `scp -O`: the sender's stream is read (the client's
/// for `scp -t`, the target's for `scp -f`).
pub(super) struct ScpTap {
    direction: Direction,
    reader: Scp,
}

impl ScpTap {
    /// A tap for `command`, when it is scp's remote end.
    pub(super) fn for_command(command: &str) -> Option<Self> {
        let (direction, path, to_dir) = scp::command(command)?;
        Some(ScpTap {
            direction,
            reader: Scp::new(direction, &path, to_dir),
        })
    }

    fn read(&mut self, data: &[u8]) -> Kinds {
        self.reader
            .feed(data)
            .map(|ops| ops.into_iter().map(|o| self.event(o)).collect())
            .map_err(|e| format!("the scp stream cannot be followed: {e}"))
    }

    fn event(&self, o: scp::Op) -> ev::event::Kind {
        let (read, written) = match self.direction {
            Direction::Upload => (0, o.size),
            Direction::Download => (o.size, 0),
        };
        ev::event::Kind::FileOp(ev::FileOp {
            protocol: "scp".into(),
            op: o.op.into(),
            path: o.path,
            target: o.name,
            flags: if o.mode.is_empty() {
                vec![]
            } else {
                vec![o.mode]
            },
            read,
            written,
            status: o.status,
        })
    }
}

impl Tap for ScpTap {
    fn input(&mut self, data: &[u8]) -> Kinds {
        match self.direction {
            Direction::Upload => self.read(data),
            Direction::Download => Ok(vec![]),
        }
    }

    fn output(&mut self, data: &[u8]) -> Kinds {
        match self.direction {
            Direction::Download => self.read(data),
            Direction::Upload => Ok(vec![]),
        }
    }

    fn finish(&mut self) -> Vec<ev::event::Kind> {
        self.reader
            .finish()
            .into_iter()
            .map(|o| self.event(o))
            .collect()
    }
}

/// A port forward: bytes each way, recorded when it ends.
pub(super) struct TrafficTap {
    pub destination: String,
    pub to_target: u64,
    pub from_target: u64,
}

impl Tap for TrafficTap {
    fn input(&mut self, data: &[u8]) -> Kinds {
        self.to_target += data.len() as u64;
        Ok(vec![])
    }

    fn output(&mut self, data: &[u8]) -> Kinds {
        self.from_target += data.len() as u64;
        Ok(vec![])
    }

    fn finish(&mut self) -> Vec<ev::event::Kind> {
        vec![ev::event::Kind::Traffic(ev::Traffic {
            destination: self.destination.clone(),
            to_target: self.to_target,
            from_target: self.from_target,
        })]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scp_uploads_are_read_from_the_client_and_downloads_from_the_target() {
        let mut up = ScpTap::for_command("scp -t -- /tmp/up.bin").unwrap();
        assert!(up.output(b"C0644 3 x\nabc\0").unwrap().is_empty());
        let got = up.input(b"C0644 3 local.bin\nabc\0").unwrap();
        let Some(ev::event::Kind::FileOp(f)) = got.first() else {
            panic!("{got:?}")
        };
        assert_eq!(
            (f.op.as_str(), f.path.as_str(), f.written),
            ("upload", "/tmp/up.bin", 3)
        );
        let mut down = ScpTap::for_command("scp -f /etc/hosts").unwrap();
        assert!(down.input(b"\0").unwrap().is_empty());
        let got = down.output(b"C0644 2 hosts\nok\0").unwrap();
        let Some(ev::event::Kind::FileOp(f)) = got.first() else {
            panic!("{got:?}")
        };
        assert_eq!((f.op.as_str(), f.read), ("download", 2));
        assert!(ScpTap::for_command("ls -l").is_none());
    }
}
