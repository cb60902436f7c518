//! Connecting the sink `run` was asked for.

use std::sync::Arc;

use outboxkv::relay::Sink;

use crate::settings::SinkChoice;
use crate::{Fail, bad};

/// Why a sink could not be set up.
pub(crate) enum ConnectError {
    /// The broker is not there, or refuses, or lacks what the sink needs:
    /// `run` keeps trying (unhealthy meanwhile), so a sidecar started
    /// before its broker does not crash-loop.
    Broker(String),
    /// Nothing a retry can fix (a file that is not the sink's own, a sink
    /// this build lacks): `run` exits.
    Final(Fail),
}

impl From<outboxkv::Error> for ConnectError {
    fn from(e: outboxkv::Error) -> Self {
        match e {
            outboxkv::Error::Broker { message, .. } => ConnectError::Broker(message),
            other => ConnectError::Final(other.into()),
        }
    }
}

pub(crate) async fn connect(choice: &SinkChoice) -> Result<Arc<dyn Sink>, ConnectError> {
    match choice {
        SinkChoice::File(path) => Ok(Arc::new(outboxkv::sink::FileSink::open(path)?)),
        SinkChoice::Stdout => Ok(Arc::new(outboxkv::sink::StdoutSink)),
        #[cfg(feature = "nats")]
        SinkChoice::Nats(n) => {
            use outboxkv::sink::nats::{ContentMode, NatsOptions, NatsSink, StreamSetup};
            let mut o = NatsOptions::new(n.url.clone());
            if let Some(s) = &n.subject {
                o = o.subject_template(s.clone());
            }
            if let Some(c) = &n.creds {
                o = o.credentials_file(c.clone());
            }
            if let Some(t) = &n.token {
                o = o.token(t.clone());
            }
            if let Some((u, p)) = &n.user {
                o = o.user_and_password(u.clone(), p.clone());
            }
            if let Some(ca) = &n.ca {
                o = o.root_ca(ca.clone());
            }
            if n.binary {
                o = o.content_mode(ContentMode::Binary);
            }
            o = o.prefix(n.prefix.clone().unwrap_or_else(|| "events".into()));
            if let Some(name) = &n.stream {
                let setup = StreamSetup::for_template(name.clone(), &o)
                    .map_err(|e| ConnectError::Final(e.into()))?;
                o = o.create_stream(setup);
            }
            Ok(Arc::new(NatsSink::connect(o).await?))
        }
        #[cfg(feature = "kafka")]
        SinkChoice::Kafka(k) => {
            use outboxkv::sink::kafka::{KafkaOptions, KafkaSink};
            let mut o =
                KafkaOptions::new(k.brokers.clone()).restart_scan_without_read(k.scan_without_read);
            for (key, v) in &k.options {
                o = o.set(key.clone(), v.clone());
            }
            if let Some(t) = &k.topic {
                o = o.topic_template(t.clone());
            }
            Ok(Arc::new(KafkaSink::connect(o).await?))
        }
        #[allow(unreachable_patterns)]
        _ => Err(ConnectError::Final(bad(
            "this outbox-relay was built without that sink (cargo features nats, kafka)",
        ))),
    }
}
