//! The codec of every `sked.v1` service and client: prost underneath, with
//! the input boundary in front of the handlers.
//!
//! tonic's own prost codec answers a message that does not decode (invalid
//! UTF-8 in a string, a truncated message, nesting past prost's recursion
//! limit) with `INTERNAL`; the client's input is at fault, so here it is
//! `INVALID_ARGUMENT` with a `BadRequest` on `request`. A decoded request is
//! then checked by [`boundary`] (NUL, lengths, ranges,
//! params size and depth). Messages that are not `sked.v1` requests (the
//! responses our own clients decode) are decoded as prost does.

use std::marker::PhantomData;

use bytes::Buf;
use prost::{Message, Name};
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstCodec;

use super::boundary;
use crate::domain::FieldViolation;

/// `tonic_prost::ProstCodec` plus the input boundary (module docs).
#[derive(Debug, Clone)]
pub struct BoundaryCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for BoundaryCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for BoundaryCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Name + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = BoundaryDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        BoundaryDecoder {
            request: boundary::is_request(&U::full_name()),
            _pd: PhantomData,
        }
    }
}

/// Decodes `U`; for a `sked.v1` request also checks it at the boundary.
#[derive(Debug)]
pub struct BoundaryDecoder<U> {
    request: bool,
    _pd: PhantomData<U>,
}

impl<U> Decoder for BoundaryDecoder<U>
where
    U: Message + Default + Name + Send + 'static,
{
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        if !self.request {
            return U::decode(buf)
                .map(Some)
                .map_err(|e| Status::internal(e.to_string()));
        }
        let bytes = buf.copy_to_bytes(buf.remaining());
        let item = U::decode(bytes.clone()).map_err(|e| {
            let e = e.to_string();
            let reason = if e.contains("recursion limit") {
                format!(
                    "nests messages deeper than the decoder's limit of 100 (params may nest at most {} levels)",
                    boundary::MAX_PARAMS_DEPTH
                )
            } else {
                format!("is not a valid {} message: {e}", U::NAME)
            };
            super::invalid(FieldViolation::new("request", reason))
        })?;
        boundary::check_encoded(&U::full_name(), &bytes).map_err(super::invalid)?;
        Ok(Some(item))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}
