//! Hot reload under load, SIGHUP, and shutdown that drains.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use phoenix_agent::otlp::testdata;
use support::*;

/// A valid config; `variant` changes the baseline's batch and the candidate's filter, so
/// every valid reload replaces both pipelines (the hardest case for losing data).
fn valid(sink: &Sink, variant: u32) -> String {
    format!(
        r#"
receivers:
  otlp:
    protocols:
      grpc: {{ endpoint: "{{GRPC}}" }}
processors:
  batch: {{ send_batch_size: {size}, timeout: {timeout}ms }}
  filter/x: {{ exclude: {{ metric_names: ["process.metric.{excluded}"] }} }}
exporters:
  otlp: {{ endpoint: "{url}" }}
  blackhole: {{}}
pipelines:
  baseline: {{ receivers: [otlp], processors: [batch], exporters: [otlp] }}
  candidate: {{ receivers: [otlp], processors: [filter/x, batch], exporters: [blackhole], shadow: true }}
telemetry: {{ listen: "{{TELEMETRY}}" }}
"#,
        size = 50 + variant * 7,
        timeout = 40 + variant * 3,
        excluded = variant % 2,
        url = sink.url(),
    )
}

const INVALID: &str = r#"
receivers:
  otlp: { protocols: { grpc: { endpoint: "{GRPC}" } } }
processors:
  batch: { send_batch_size: 0 }
exporters:
  blackhole: {}
pipelines:
  baseline: { receivers: [otlp], processors: [batch], exporters: [blackhole] }
telemetry: { listen: "{TELEMETRY}" }
"#;

async fn reloads(agent: &Agent) -> (f64, f64) {
    let m = agent.metrics().await;
    (
        metric_value(&m, "phoenix_config_reloads_total", &[("result", "success")]),
        metric_value(&m, "phoenix_config_reloads_total", &[("result", "failure")]),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_reloads_under_load_deliver_every_point_exactly_once() {
    let sink = Sink::start().await;
    let agent = Agent::start(&valid(&sink, 0)).await;

    // A sender that tags every request with its sequence number and retries refusals
    // (backpressure means "not accepted", so a retry never duplicates).
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let sender = {
        let (stop, sent) = (stop.clone(), sent.clone());
        let mut client = grpc_client(&agent).await;
        tokio::spawn(async move {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut request = testdata::request(2, 2, 3); // 12 points
                for rm in &mut request.resource_metrics {
                    let resource = rm.resource.as_mut().unwrap();
                    resource
                        .attributes
                        .push(testdata::int_attr("seq", seq as i64));
                }
                loop {
                    match client.export(request.clone()).await {
                        Ok(_) => break,
                        Err(s) if s.code() == tonic::Code::Unavailable => {
                            tokio::time::sleep(Duration::from_millis(20)).await
                        }
                        Err(s) => panic!("request {seq} failed: {s}"),
                    }
                }
                seq += 1;
                sent.store(seq, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    for i in 1..=20u32 {
        let before = reloads(&agent).await;
        if i % 2 == 1 {
            agent.write_config(INVALID);
        } else {
            agent.write_config(&valid(&sink, i));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = reloads(&agent).await;
            if now.0 + now.1 > before.0 + before.1 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "reload {i} not applied:\n{}",
                agent.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    sender.await.unwrap();

    let requests = sent.load(Ordering::Relaxed);
    assert!(
        requests > 100,
        "the sender kept sending during the reloads: {requests}"
    );
    let expected = requests * 12;
    assert_eq!(
        sink.wait_for(expected, Duration::from_secs(20)).await,
        expected
    );
    let points = flatten(&sink.requests());
    let distinct: HashSet<&String> = points.iter().collect();
    assert_eq!(distinct.len() as u64, expected, "every point exactly once");

    assert_eq!(reloads(&agent).await, (10.0, 10.0));
    let log = agent.log();
    assert!(
        log.contains("processors.batch.send_batch_size: must be greater than 0"),
        "the rejection names the key path:\n{log}"
    );
    assert!(log.contains("the running configuration stays"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_and_an_unchanged_file_is_a_no_op() {
    let sink = Sink::start().await;
    let agent = Agent::start(&valid(&sink, 0)).await;
    agent.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(reloads(&agent).await, (0.0, 0.0));
    assert!(agent.log().contains("configuration unchanged"));

    let hash_before = agent.metrics().await;
    agent.write_config(&valid(&sink, 1));
    agent.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while reloads(&agent).await.0 < 1.0 {
        assert!(Instant::now() < deadline, "{}", agent.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hash_after = agent.metrics().await;
    let info = |m: &str| {
        m.lines()
            .find(|l| l.starts_with("phoenix_config_info{") && l.ends_with(" 1"))
            .map(str::to_string)
    };
    assert_ne!(
        info(&hash_before),
        info(&hash_after),
        "the config hash changed"
    );

    // The receiver's socket survived the reload: the same client keeps working.
    let mut client = grpc_client(&agent).await;
    client.export(testdata::request(1, 1, 2)).await.unwrap();
    assert_eq!(sink.wait_for(2, Duration::from_secs(5)).await, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_pending_batches_and_exits_zero() {
    let sink = Sink::start().await;
    // A batch that would wait an hour: only the shutdown flush can deliver it.
    let config = format!(
        r#"
receivers:
  otlp: {{ protocols: {{ grpc: {{ endpoint: "{{GRPC}}" }} }} }}
processors:
  batch: {{ send_batch_size: 100000, timeout: 1h }}
exporters:
  otlp: {{ endpoint: "{}" }}
pipelines:
  baseline: {{ receivers: [otlp], processors: [batch], exporters: [otlp] }}
telemetry: {{ listen: "{{TELEMETRY}}" }}
shutdown_grace_period: 10s
"#,
        sink.url()
    );
    let agent = Agent::start(&config).await;
    let mut client = grpc_client(&agent).await;
    for _ in 0..5 {
        client.export(testdata::request(3, 2, 2)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sink.data_points(), 0, "still batched");
    let (status, log) = tokio::task::spawn_blocking(move || agent.terminate())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status}:\n{log}");
    assert_eq!(sink.data_points(), 60);
    assert!(log.contains("every queue drained"), "{log}");
}

/// A `meter` section added and changed by reloads applies to the running pipeline without
/// restarting it: its other counters go on, and a conserved total survives a longer list.
#[tokio::test(flavor = "multi_thread")]
async fn a_reloaded_meter_config_keeps_the_running_pipelines_counters() {
    let config = |meter: &str| {
        format!(
            r#"
receivers:
  otlp: {{ protocols: {{ grpc: {{ endpoint: "{{GRPC}}" }} }} }}
exporters:
  blackhole: {{}}
pipelines:
  baseline: {{ receivers: [otlp], exporters: [blackhole] }}
telemetry: {{ listen: "{{TELEMETRY}}" }}
{meter}
"#
        )
    };
    let agent = Agent::start(&config("")).await;
    let mut client = grpc_client(&agent).await;
    let wait_for = |what: &'static str, done: Box<dyn Fn(&str) -> bool + Send>| {
        let agent = &agent;
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let m = agent.metrics().await;
                if done(&m) {
                    return m;
                }
                assert!(Instant::now() < deadline, "{what}:\n{m}\n{}", agent.log());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let reloaded = |n: f64| {
        Box::new(move |m: &str| {
            metric_value(m, "phoenix_config_reloads_total", &[("result", "success")]) >= n
        }) as Box<dyn Fn(&str) -> bool + Send>
    };
    let conserved = |m: &str| {
        metric_value(
            m,
            "phoenix_pipeline_output_conserved_total",
            &[("pipeline", "baseline"), ("metric", "process.metric.0")],
        )
    };

    client.export(testdata::request(2, 2, 3)).await.unwrap();
    wait_for(
        "the first request is metered",
        Box::new(|m| {
            metric_value(
                m,
                "phoenix_pipeline_output_datapoints_total",
                &[("pipeline", "baseline")],
            ) == 12.0
        }),
    )
    .await;

    agent.write_config(&config("meter: { conserve: [process.metric.0] }"));
    wait_for("the meter is added", reloaded(1.0)).await;
    // Cumulative series that started before the meter: the first request sets baselines,
    // the second adds 10 to each of the 6 series of process.metric.0.
    let grown = |by: f64| {
        let mut request = testdata::request(2, 2, 3);
        for rm in &mut request.resource_metrics {
            for metric in &mut rm.scope_metrics[0].metrics {
                if let Some(opentelemetry_proto::tonic::metrics::v1::metric::Data::Sum(sum)) =
                    &mut metric.data
                {
                    for point in &mut sum.data_points {
                        if let Some(
                            opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsDouble(v),
                        ) = &mut point.value
                        {
                            *v += by;
                        }
                    }
                }
            }
        }
        request
    };
    client.export(grown(0.0)).await.unwrap();
    client.export(grown(10.0)).await.unwrap();
    let m = wait_for(
        "the conserved total counts the increase",
        Box::new(move |m| conserved(m) == 60.0),
    )
    .await;
    assert_eq!(
        metric_value(
            &m,
            "phoenix_pipeline_output_datapoints_total",
            &[("pipeline", "baseline")]
        ),
        36.0,
        "the pipeline's counters went on"
    );

    agent.write_config(&config(
        "meter: { conserve: [process.metric.0, process.metric.1] }",
    ));
    let m = wait_for("the meter is changed", reloaded(2.0)).await;
    assert_eq!(conserved(&m), 60.0);
    client.export(grown(20.0)).await.unwrap();
    wait_for(
        "the pipeline keeps metering",
        Box::new(|m| {
            metric_value(
                m,
                "phoenix_pipeline_output_datapoints_total",
                &[("pipeline", "baseline")],
            ) == 48.0
        }),
    )
    .await;
    // The new list started its baselines afresh: the total of the name kept is unchanged.
    assert_eq!(conserved(&agent.metrics().await), 60.0);
}
