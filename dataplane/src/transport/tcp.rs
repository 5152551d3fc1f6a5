//! TCP transport.
use std::net::TcpStream;

/// Source half over N TCP streams.
pub struct TcpSource {
    _streams: Vec<TcpStream>,
}
impl TcpSource {
    pub fn new(streams: Vec<TcpStream>) -> Result<Self, super::TransportError> {
        Ok(Self { _streams: streams })
    }
}
/// Destination half over N TCP streams.
pub struct TcpDestination {
    _streams: Vec<TcpStream>,
}
impl TcpDestination {
    pub fn new(streams: Vec<TcpStream>) -> Result<Self, super::TransportError> {
        Ok(Self { _streams: streams })
    }
}
