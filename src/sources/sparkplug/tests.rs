//! Tests of the decoder: topics, births and aliases, the JSON mapping, the
//! wire scan's caps and the alias-table bounds.

use std::sync::Arc;

use super::json::{INT16, INT32};
use super::proto::payload::metric::Value as MV;
use super::proto::payload::{DataSet, Metric, PropertySet, PropertyValue, Template};
use super::*;

fn metric(name: Option<&str>, alias: Option<u64>, dt: Option<u32>, v: MV) -> Metric {
    Metric {
        name: name.map(String::from),
        alias,
        datatype: dt,
        value: Some(v),
        ..Default::default()
    }
}

fn payload(seq: u64, metrics: Vec<Metric>) -> Vec<u8> {
    Payload {
        timestamp: Some(1_764_409_200_000),
        metrics,
        seq: Some(seq),
        ..Default::default()
    }
    .encode_to_vec()
}

#[test]
fn topics_follow_the_sparkplug_namespace() {
    assert_eq!(
        Topic::parse("spBv1.0/plant/DDATA/line3/press07").unwrap(),
        Topic::Edge {
            group: "plant",
            kind: MessageType::DData,
            node: "line3",
            device: Some("press07")
        }
    );
    assert_eq!(
        Topic::parse("spBv1.0/STATE/scada").unwrap(),
        Topic::State { host: "scada" }
    );
    for bad in [
        "spBv1.0/plant/NDATA/line3/extra",
        "spBv1.0/plant/DDATA/line3",
        "spBv1.0/plant/XDATA/line3",
        "spAv1.0/plant/NDATA/line3",
        "machines/press07/state",
        "spBv1.0//NDATA/line3",
    ] {
        assert!(Topic::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn data_metrics_get_their_names_and_types_from_the_births() {
    let mut d = Decoder::new();
    let birth = payload(
        0,
        vec![
            metric(Some("bdSeq"), None, Some(8), MV::LongValue(1)),
            metric(Some("Line/Speed"), Some(1), Some(INT32), MV::IntValue(10)),
        ],
    );
    d.decode("spBv1.0/plant/NBIRTH/line3", &birth).unwrap();
    let dbirth = payload(
        1,
        vec![metric(
            Some("Temperature"),
            Some(7),
            Some(10),
            MV::DoubleValue(20.0),
        )],
    );
    d.decode("spBv1.0/plant/DBIRTH/line3/press07", &dbirth)
        .unwrap();
    let data = payload(
        2,
        vec![
            metric(None, Some(7), None, MV::DoubleValue(61.5)),
            metric(None, Some(1), None, MV::IntValue((-3i32) as u32)),
            metric(None, Some(99), None, MV::IntValue(5)),
        ],
    );
    let out = d
        .decode("spBv1.0/plant/DDATA/line3/press07", &data)
        .unwrap();
    assert_eq!(out.stream, "plant/line3/press07");
    assert_eq!(
        out.id.as_deref(),
        Some("spb:plant/line3/press07:DDATA:2:1764409200000")
    );
    let m = &out.data["metrics"];
    assert_eq!(m[0]["name"], "Temperature");
    assert_eq!(m[0]["datatype"], "Double");
    assert_eq!(m[0]["value"], 61.5);
    assert_eq!(m[1]["name"], "Line/Speed");
    assert_eq!(m[1]["value"], -3);
    assert_eq!(m[2]["name"], Value::Null);
    assert_eq!(m[2]["alias"], 99);
    assert_eq!(out.data["device_id"], "press07");
    assert_eq!(out.data["seq"], 2);

    // A new NBIRTH forgets the old aliases.
    d.decode("spBv1.0/plant/NBIRTH/line3", &payload(0, vec![]))
        .unwrap();
    let out = d
        .decode("spBv1.0/plant/DDATA/line3/press07", &data)
        .unwrap();
    assert_eq!(out.data["metrics"][0]["name"], Value::Null);
}

#[test]
fn garbage_is_not_a_payload() {
    let mut d = Decoder::new();
    let err = d
        .decode("spBv1.0/plant/NDATA/line3", &[0xff, 0xff, 0xff, 0x07])
        .unwrap_err();
    assert!(err.contains("not a Sparkplug B protobuf"), "{err}");
}

#[test]
fn datasets_templates_and_nulls() {
    use proto::payload::data_set::{DataSetValue, Row, data_set_value::Value as DV};
    let ds = DataSet {
        num_of_columns: Some(2),
        columns: vec!["a".into(), "b".into()],
        types: vec![INT16, 12],
        rows: vec![Row {
            elements: vec![
                DataSetValue {
                    value: Some(DV::IntValue((-2i16) as u16 as u32)),
                },
                DataSetValue {
                    value: Some(DV::StringValue("x".into())),
                },
            ],
        }],
    };
    let mut null = metric(Some("n"), None, Some(10), MV::DoubleValue(1.0));
    null.is_null = Some(true);
    let mut d = Decoder::new();
    let out = d
        .decode(
            "spBv1.0/g/NDATA/n",
            &payload(
                3,
                vec![
                    metric(Some("ds"), None, Some(16), MV::DatasetValue(ds)),
                    null,
                    metric(Some("raw"), None, Some(17), MV::BytesValue(vec![0, 1, 2])),
                ],
            ),
        )
        .unwrap();
    let m = &out.data["metrics"];
    assert_eq!(m[0]["value"]["rows"][0], json!([-2, "x"]));
    assert_eq!(m[0]["value"]["types"], json!(["Int16", "String"]));
    assert_eq!(m[1]["value"], Value::Null);
    assert_eq!(m[2]["value"], "AAEC");
}
fn empty_metrics(n: usize) -> Vec<u8> {
    Payload {
        timestamp: Some(1_764_409_200_000),
        metrics: vec![Metric::default(); n],
        seq: Some(1),
        ..Default::default()
    }
    .encode_to_vec()
}

#[test]
fn the_wire_scan_counts_top_level_metrics() {
    assert!(wire::check(&empty_metrics(10), 10).is_ok());
    let err = wire::check(&empty_metrics(11), 10).unwrap_err();
    assert!(err.contains("more than 10 metrics"), "{err}");
    assert!(err.contains("sparkplug_max_metrics"), "{err}");
    assert!(
        wire::check(&[], 0).is_ok(),
        "an empty payload has no metrics"
    );
}

#[test]
fn a_message_over_max_metrics_is_refused_before_it_is_decoded() {
    let mut d = Decoder::with_limits(Limits {
        max_metrics: 1000,
        ..Limits::default()
    });
    assert!(d.decode("spBv1.0/g/NDATA/n", &empty_metrics(1000)).is_ok());
    let err = d
        .decode("spBv1.0/g/NDATA/n", &empty_metrics(1001))
        .unwrap_err();
    assert!(err.contains("refused before decoding"), "{err}");
}

#[test]
fn nested_values_count_against_max_metrics() {
    use proto::payload::data_set::{DataSetValue, Row};
    let cells = |rows: usize, cols: usize| DataSet {
        num_of_columns: Some(cols as u64),
        columns: vec!["c".into(); cols],
        types: vec![INT32; cols],
        rows: vec![
            Row {
                elements: vec![DataSetValue::default(); cols],
            };
            rows
        ],
    };
    // 10 columns + 10 types + 10 rows × (1 + 10 cells) + the metric = 131.
    let ds = payload(
        1,
        vec![metric(
            None,
            None,
            Some(16),
            MV::DatasetValue(cells(10, 10)),
        )],
    );
    assert!(wire::check(&ds, 131).is_ok());
    assert!(wire::check(&ds, 130).is_err());

    let template = Template {
        metrics: vec![Metric::default(); 50],
        parameters: vec![Default::default(); 20],
        ..Default::default()
    };
    let t = payload(
        1,
        vec![metric(None, None, Some(19), MV::TemplateValue(template))],
    );
    assert!(wire::check(&t, 71).is_ok());
    assert!(wire::check(&t, 70).is_err());

    let props = PropertySet {
        keys: vec!["k".into(); 30],
        values: vec![PropertyValue::default(); 30],
    };
    let mut m = metric(None, None, Some(10), MV::DoubleValue(1.0));
    m.properties = Some(props);
    let p = payload(1, vec![m]);
    assert!(wire::check(&p, 61).is_ok());
    assert!(wire::check(&p, 60).is_err());
}

#[test]
fn templates_nested_too_deep_are_refused() {
    let mut inner = Metric::default();
    for _ in 0..40 {
        inner = Metric {
            value: Some(MV::TemplateValue(Template {
                metrics: vec![inner],
                ..Default::default()
            })),
            ..Default::default()
        };
    }
    let err = wire::check(&payload(1, vec![inner]), 1_000_000).unwrap_err();
    assert!(err.contains("deeper than 32"), "{err}");
}

#[test]
fn truncated_and_malformed_wire_data_never_panics() {
    let good = payload(
        7,
        vec![
            metric(Some("a"), Some(1), Some(10), MV::DoubleValue(1.5)),
            metric(
                Some("b"),
                Some(2),
                Some(12),
                MV::StringValue("x".repeat(40)),
            ),
        ],
    );
    for cut in 0..good.len() {
        let _ = wire::check(&good[..cut], 100);
        let _ = Decoder::new().decode("spBv1.0/g/NBIRTH/n", &good[..cut]);
    }
    for bad in [
        &[0x80u8][..],                         // a varint that never ends
        &[0xff; 11],                           // a varint of 11 bytes
        &[0x12, 0xff, 0xff, 0xff, 0xff, 0x0f], // a length far past the end
        &[0x09, 1, 2, 3],                      // fixed64 cut short
        &[0x0b],                               // a group
        &[0x00, 0x00],                         // field number 0
    ] {
        let err = wire::check(bad, 100).unwrap_err();
        assert!(err.contains("not a Sparkplug B protobuf"), "{err}");
    }
}

#[test]
fn an_event_over_max_event_size_is_refused() {
    let mut d = Decoder::with_limits(Limits {
        max_event_size: 4096,
        ..Limits::default()
    });
    // 300 empty metrics: 600 bytes on the wire, about 4 KiB of JSON.
    let err = d
        .decode("spBv1.0/g/NDATA/n", &empty_metrics(300))
        .unwrap_err();
    assert!(err.contains("more than 4096 bytes"), "{err}");
    assert!(d.decode("spBv1.0/g/NDATA/n", &empty_metrics(10)).is_ok());
}

fn birth(aliases: u64) -> Vec<u8> {
    payload(
        0,
        (0..aliases)
            .map(|a| {
                metric(
                    Some(&format!("m{a}")),
                    Some(a),
                    Some(10),
                    MV::DoubleValue(0.0),
                )
            })
            .collect(),
    )
}

fn data_name(d: &mut Decoder, node: &str) -> Value {
    let data = payload(1, vec![metric(None, Some(0), None, MV::DoubleValue(1.0))]);
    let out = d.decode(&format!("spBv1.0/g/NDATA/{node}"), &data).unwrap();
    out.data["metrics"][0]["name"].clone()
}

#[test]
fn the_node_table_forgets_the_least_recently_used_node_beyond_max_nodes() {
    let mut d = Decoder::with_limits(Limits {
        max_nodes: 3,
        ..Limits::default()
    });
    for n in ["a", "b", "c"] {
        d.decode(&format!("spBv1.0/g/NBIRTH/{n}"), &birth(2))
            .unwrap();
    }
    assert_eq!(data_name(&mut d, "a"), "m0", "a is now the most recent");
    d.decode("spBv1.0/g/NBIRTH/d", &birth(2)).unwrap();
    assert_eq!(d.nodes_remembered(), 3);
    assert_eq!(data_name(&mut d, "b"), Value::Null, "b was forgotten");
    assert_eq!(data_name(&mut d, "a"), "m0");
    assert_eq!(data_name(&mut d, "c"), "m0");
    assert_eq!(data_name(&mut d, "d"), "m0");
    for i in 0..100 {
        d.decode(&format!("spBv1.0/g/NBIRTH/x{i}"), &birth(1))
            .unwrap();
    }
    assert_eq!(d.nodes_remembered(), 3);
}

#[test]
fn births_over_max_aliases_are_refused() {
    let mut d = Decoder::with_limits(Limits {
        max_aliases: 5,
        ..Limits::default()
    });
    d.decode("spBv1.0/g/NBIRTH/n", &birth(5)).unwrap();
    let err = d.decode("spBv1.0/g/NBIRTH/n", &birth(6)).unwrap_err();
    assert!(err.contains("sparkplug_max_aliases"), "{err}");
    // The refused NBIRTH replaced the old birth: nothing is known now.
    assert_eq!(data_name(&mut d, "n"), Value::Null);

    d.decode("spBv1.0/g/NBIRTH/n", &birth(3)).unwrap();
    let dbirth = payload(
        1,
        (10..13)
            .map(|a| metric(Some("t"), Some(a), Some(10), MV::DoubleValue(0.0)))
            .collect(),
    );
    let err = d.decode("spBv1.0/g/DBIRTH/n/dev", &dbirth).unwrap_err();
    assert!(err.contains("sparkplug_max_aliases"), "{err}");
    // A refused DBIRTH leaves the node's table as it was.
    assert_eq!(data_name(&mut d, "n"), "m0");
}

#[test]
fn the_alias_memory_bound_forgets_old_nodes_and_refuses_a_birth_too_large_alone() {
    let mut d = Decoder::with_limits(Limits {
        alias_memory: 64 * 1024,
        ..Limits::default()
    });
    // 200 aliases, each counted twice (alias and named datatype) at about
    // 100 bytes: about 40 KiB per node, so one fits and two do not.
    d.decode("spBv1.0/g/NBIRTH/a", &birth(200)).unwrap();
    d.decode("spBv1.0/g/NBIRTH/b", &birth(200)).unwrap();
    assert_eq!(d.nodes_remembered(), 1);
    assert_eq!(data_name(&mut d, "a"), Value::Null);
    assert_eq!(data_name(&mut d, "b"), "m0");
    let err = d.decode("spBv1.0/g/NBIRTH/c", &birth(400)).unwrap_err();
    assert!(err.contains("sparkplug_alias_memory"), "{err}");
    assert!(d.nodes.bytes <= 64 * 1024);
}

#[test]
fn a_snapshot_shares_the_node_tables() {
    let mut d = Decoder::new();
    d.decode("spBv1.0/g/NBIRTH/a", &birth(100)).unwrap();
    let snapshot = d.clone();
    let a = ("g".to_owned(), "a".to_owned());
    assert!(Arc::ptr_eq(
        &d.nodes.nodes[&a].defs,
        &snapshot.nodes.nodes[&a].defs
    ));
    // A DBIRTH after the snapshot leaves the snapshot's table alone.
    d.decode("spBv1.0/g/DBIRTH/a/dev", &birth(200)).unwrap();
    assert_eq!(snapshot.nodes.nodes[&a].defs.by_alias.len(), 100);
    assert_eq!(d.nodes.nodes[&a].defs.by_alias.len(), 200);
}
