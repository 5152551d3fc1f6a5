//! Loopback TCP connections between the two halves of an in-process migration, built the
//! way the engine tests build them: one control connection and N data streams.

use std::net::{TcpListener, TcpStream};

use anyhow::Context;

/// Both ends of every connection; index `i` on one side is connected to index `i` on the other.
pub struct Link {
    pub source_control: TcpStream,
    pub source_data: Vec<TcpStream>,
    pub destination_control: TcpStream,
    pub destination_data: Vec<TcpStream>,
}

/// `count` connected loopback TCP pairs: (connecting end, accepted end).
pub fn loopback_pairs(count: usize) -> anyhow::Result<Vec<(TcpStream, TcpStream)>> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback listener")?;
    let addr = listener.local_addr()?;
    (0..count)
        .map(|_| {
            let a = TcpStream::connect(addr).context("connecting on loopback")?;
            let (b, _) = listener.accept().context("accepting on loopback")?;
            Ok((a, b))
        })
        .collect()
}

impl Link {
    pub fn loopback(streams: usize) -> anyhow::Result<Self> {
        let mut pairs = loopback_pairs(1 + streams)?.into_iter();
        let (source_control, destination_control) = pairs.next().expect("1 + streams pairs");
        let (source_data, destination_data) = pairs.unzip();
        Ok(Self {
            source_control,
            source_data,
            destination_control,
            destination_data,
        })
    }
}
