//! Kafka helpers for tests and benchmarks (feature `kafka`).

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;

/// Creates `topic` with `partitions` partitions and topic `config`.
pub async fn create_topic(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    config: &[(&str, &str)],
) -> Result<(), Box<dyn std::error::Error>> {
    create_topic_as(bootstrap, &[], topic, partitions, config).await
}

/// [`create_topic`] with client settings (a login).
pub async fn create_topic_as(
    bootstrap: &str,
    client: &[(String, String)],
    topic: &str,
    partitions: i32,
    config: &[(&str, &str)],
) -> Result<(), Box<dyn std::error::Error>> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    for (k, v) in client {
        c.set(k, v);
    }
    let admin: AdminClient<DefaultClientContext> = c.create()?;
    let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    for (k, v) in config {
        new = new.set(k, v);
    }
    let results = admin
        .create_topics(
            [&new],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        )
        .await?;
    for r in results {
        r.map_err(|(t, e)| format!("create topic {t}: {e}"))?;
    }
    Ok(())
}
