//! Traces leave over OTLP and hang together: an in-process OTLP/gRPC receiver collects what the
//! app exports while an order is placed, and the request, its command, the append, the saga's
//! step, the projection batch that handled its event and the subscription push that showed it
//! share one trace id.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use orderly_service::settings::LogFormat;
use serde_json::json;

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|value| match value {
            Value::StringValue(s) => s.clone(),
            other => format!("{other:?}"),
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_placed_order_is_one_trace_from_the_request_to_the_projection_and_the_saga() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let telemetry = orderly_service::telemetry::init(LogFormat::Json, Some(&endpoint)).unwrap();

    let db = migrated_database().await;
    let api = start_with_saga(&settings_for(db.url())).await;
    register(&api, "TEA-1", 450, "EUR", 5).await;
    // The caller's own trace: the request's span becomes its child.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let placed = api
        .http
        .post(format!("{}/graphql", api.base))
        .bearer_auth(customer("carol"))
        .header(
            "traceparent",
            format!("00-{caller_trace}-00f067aa0ba902b7-01"),
        )
        .json(&json!({ "query": PLACE,
            "variables": order_input(json!([{ "sku": "TEA-1", "quantity": 1 }]), "tok_ok") }))
        .send()
        .await
        .unwrap();
    assert_eq!(placed.status(), 200);
    let placed: serde_json::Value = placed.json().await.unwrap();
    let order_id = placed["data"]["placeOrder"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    eventually(
        &db,
        "select count(*) from orders where status = 'CONFIRMED'",
        1,
        Duration::from_secs(30),
    )
    .await;

    let in_trace = |wanted: &[&str]| {
        let spans = receiver.spans.lock().unwrap();
        wanted
            .iter()
            .map(|name| {
                spans
                    .iter()
                    .filter(|span| hex(&span.trace_id) == caller_trace && span.name == *name)
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
    };
    let wanted = [
        "graphql.request",
        "command",
        "event_store.append",
        "projection.batch",
        "saga.step",
    ];
    let mut found = Vec::new();
    for _ in 0..50 {
        // Flushing waits for the export, which needs the runtime's other workers.
        tokio::task::block_in_place(|| telemetry.flush());
        found = in_trace(&wanted);
        if found.iter().all(|spans| !spans.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (name, spans) in wanted.iter().zip(&found) {
        assert!(
            !spans.is_empty(),
            "no {name} span in the caller's trace; got {:?}",
            receiver
                .spans
                .lock()
                .unwrap()
                .iter()
                .map(|s| (s.name.clone(), hex(&s.trace_id)))
                .collect::<Vec<_>>()
        );
    }
    // The request is the child of the caller's span, and the placement's command of the request.
    let request = &found[0][0];
    assert_eq!(hex(&request.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(
        attribute(request, "operation").as_deref(),
        Some("placeOrder")
    );
    let place = found[1]
        .iter()
        .find(|span| attribute(span, "command").as_deref() == Some("order.place"))
        .expect("the order.place command span");
    assert_eq!(place.parent_span_id, request.span_id);
    assert!(
        found[2]
            .iter()
            .any(|append| append.parent_span_id == place.span_id),
        "the placement's append is a child of its command"
    );

    // A subscription push continues the trace of the request whose event it shows: the
    // warehouse ships and delivers in the caller's trace while the customer follows the order.
    let mut socket = connect(&api, Some(&customer("carol"))).await;
    subscribe(
        &mut socket,
        "follow",
        "subscription($id: UUID!) { orderUpdated(orderId: $id, afterVersion: 3) { status } }",
        json!({ "id": order_id }),
    )
    .await;
    for (mutation, status) in [(SHIP, "SHIPPED"), (DELIVER, "DELIVERED")] {
        let sent = api
            .http
            .post(format!("{}/graphql", api.base))
            .bearer_auth(warehouse())
            .header(
                "traceparent",
                format!("00-{caller_trace}-00f067aa0ba902b8-01"),
            )
            .json(&json!({ "query": mutation, "variables": { "id": order_id } }))
            .send()
            .await
            .unwrap();
        assert_eq!(sent.status(), 200);
        // Everything after the confirmation (version 3) is pushed. The shipment may be applied
        // before the subscription is set up (then it is pushed on catching up, outside any
        // trace); the delivery, sent after a push arrived, is pushed live. (The confirmed
        // order itself may come first, once: `afterVersion` names no payment, so the order as
        // it is, paid, counts as not seen.)
        let message = loop {
            let message = next(&mut socket).await;
            if message["payload"]["data"]["orderUpdated"]["status"] != "CONFIRMED" {
                break message;
            }
        };
        assert_eq!(
            message["payload"]["data"]["orderUpdated"]["status"], status,
            "{message}"
        );
    }
    let mut pushes = Vec::new();
    for _ in 0..50 {
        tokio::task::block_in_place(|| telemetry.flush());
        pushes = in_trace(&["subscription.push"]).remove(0);
        if !pushes.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !pushes.is_empty(),
        "no subscription.push span in the caller's trace"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
