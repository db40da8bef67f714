//! Wire contracts between the Phoenix agent, control plane and CLI.
//!
//! `phoenix.v1` (`phoenix/v1/*.proto`): `AgentService.Connect`, the agent-initiated stream
//! of hello, config offers, config statuses, volume reports and heartbeats; `FleetService` and
//! `RolloutService` for clients. The agent's data plane speaks OTLP, whose types come from
//! `opentelemetry-proto`.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("phoenix.v1");
}

/// Content hash of a config document as the control plane and agent compute it: hex SHA-256
/// of the bytes, first 16 bytes (the same width as the agent's config hash).
pub fn document_hash(document: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(document.as_bytes())[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_hash_is_stable_and_short() {
        assert_eq!(document_hash("a"), document_hash("a"));
        assert_ne!(document_hash("a"), document_hash("b"));
        assert_eq!(document_hash("").len(), 32);
    }

    #[test]
    fn messages_round_trip() {
        use prost::Message;
        let offer = v1::ServerMessage {
            body: Some(v1::server_message::Body::Offer(v1::ConfigOffer {
                document: "pipelines: {}".into(),
                hash: document_hash("pipelines: {}"),
                role: v1::OfferRole::Candidate as i32,
            })),
        };
        let bytes = offer.encode_to_vec();
        assert_eq!(v1::ServerMessage::decode(bytes.as_slice()).unwrap(), offer);
    }
}
