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

impl Link {
    pub fn loopback(streams: usize) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback listener")?;
        let addr = listener.local_addr()?;
        let pair = || -> anyhow::Result<(TcpStream, TcpStream)> {
            let a = TcpStream::connect(addr).context("connecting on loopback")?;
            let (b, _) = listener.accept().context("accepting on loopback")?;
            Ok((a, b))
        };
        let (source_control, destination_control) = pair()?;
        let mut source_data = Vec::with_capacity(streams);
        let mut destination_data = Vec::with_capacity(streams);
        for _ in 0..streams {
            let (a, b) = pair()?;
            source_data.push(a);
            destination_data.push(b);
        }
        Ok(Self {
            source_control,
            source_data,
            destination_control,
            destination_data,
        })
    }
}
