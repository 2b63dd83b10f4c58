//! An in-process Kafka cluster for the demo and the tests: librdkafka's mock broker, speaking the
//! real wire protocol on a loopback port, with consumer groups, commits and fault injection.
//!
//! The mock cluster is not `Send`, so it lives on a thread of its own and takes commands (faults
//! to inject) through a channel. Fault injection is for tests only: it exists with the `testing`
//! feature (which the crate's own tests turn on), not in the library's default surface.

use std::sync::mpsc;

use anyhow::anyhow;
use rdkafka::mocking::MockCluster;
#[cfg(feature = "testing")]
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

/// Faults the tests inject.
#[cfg(feature = "testing")]
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// The (only) broker goes down: connections are refused.
    BrokerDown,
    BrokerUp,
    /// The next `n` produce requests, from any client, fail with a non-retriable error.
    /// librdkafka's mock moves its whole stack of remaining errors down one place for every
    /// request it fails, so `n` costs O(n) per request on the mock broker's one thread, which
    /// also serves every fetch: 100,000,000 made each request a 1.6 GB memmove and slowed the
    /// daemon under test to ~25 records/s on one machine (the delivery-bound tests then failed).
    /// The tests inject 100,000: each rejected request then moves 1.6 MB.
    RejectProduces(usize),
    /// Produce requests succeed again.
    AcceptProduces,
}

#[cfg(feature = "testing")]
type Command = (Fault, mpsc::Sender<Result<(), String>>);
/// Without fault injection, the channel only tells the thread when to stop (by closing).
#[cfg(not(feature = "testing"))]
type Command = std::convert::Infallible;

/// A one-broker mock cluster on its own thread.
pub struct MockKafka {
    pub bootstrap: String,
    commands: Option<mpsc::Sender<Command>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MockKafka {
    /// Starts the cluster with the given topics and partition counts.
    pub fn start(topics: &[(&str, i32)]) -> anyhow::Result<MockKafka> {
        let topics: Vec<(String, i32)> = topics.iter().map(|(t, p)| (t.to_string(), *p)).collect();
        let (ready_tx, ready_rx) = mpsc::channel();
        let (commands, rx) = mpsc::channel::<Command>();
        let thread = std::thread::Builder::new()
            .name("mock-kafka".into())
            .spawn(move || {
                let cluster = match MockCluster::new(1) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                for (t, p) in &topics {
                    if let Err(e) = cluster.create_topic(t, *p, 1) {
                        let _ = ready_tx.send(Err(format!("creating topic {t}: {e}")));
                        return;
                    }
                }
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                // Serve fault commands until the handle is dropped.
                while let Ok(command) = rx.recv() {
                    serve(&cluster, command);
                }
            })?;
        let bootstrap = ready_rx
            .recv()
            .map_err(|_| anyhow!("the mock Kafka cluster thread died"))?
            .map_err(|e| anyhow!("cannot start the in-process Kafka cluster: {e}"))?;
        Ok(MockKafka {
            bootstrap,
            commands: Some(commands),
            thread: Some(thread),
        })
    }

    /// Injects a fault.
    #[cfg(feature = "testing")]
    pub fn inject(&self, fault: Fault) -> anyhow::Result<()> {
        let (tx, rx) = mpsc::channel();
        self.commands
            .as_ref()
            .expect("running")
            .send((fault, tx))
            .map_err(|_| anyhow!("the mock Kafka cluster thread died"))?;
        rx.recv()
            .map_err(|_| anyhow!("the mock Kafka cluster thread died"))?
            .map_err(|e| anyhow!("injecting {fault:?}: {e}"))
    }
}

#[cfg(not(feature = "testing"))]
fn serve(_: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>, command: Command) {
    match command {}
}

#[cfg(feature = "testing")]
fn serve(
    cluster: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
    (fault, reply): Command,
) {
    let result = match fault {
        Fault::BrokerDown => cluster.broker_down(1),
        Fault::BrokerUp => cluster.broker_up(1),
        Fault::RejectProduces(n) => {
            let errors = vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; n];
            cluster.request_errors(RDKafkaApiKey::Produce, &errors);
            Ok(())
        }
        Fault::AcceptProduces => {
            cluster.clear_request_errors(RDKafkaApiKey::Produce);
            Ok(())
        }
    };
    let _ = reply.send(result.map_err(|e| e.to_string()));
}

impl Drop for MockKafka {
    fn drop(&mut self) {
        drop(self.commands.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
