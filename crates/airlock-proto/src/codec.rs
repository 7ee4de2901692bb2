//! The protobuf codec for the gateway stream, with small buffers.
//!
//! A fleet holds one stream per appliance for weeks, and tonic's default codec allocates an
//! 8 KiB encode and an 8 KiB decode buffer per stream: at 10,000 appliances that alone is
//! 160 MiB of mostly idle server memory. Gateway messages are a few hundred bytes (a CSR or
//! certificate about one KiB), and the buffers still grow on demand for anything larger.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial per-stream buffer size for each direction.
pub const BUFFER_BYTES: usize = 1024;
/// tonic's default: how much a stream may encode before yielding to the runtime.
const YIELD_THRESHOLD: usize = 32 * 1024;

#[derive(Debug)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
    }
}
