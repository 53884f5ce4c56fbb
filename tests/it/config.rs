//! The config contract seen from outside: the shipped example configs parse,
//! `load` resolves and checks files, and every kind of bad input is reported
//! with its key path, line and a useful message, all issues at once.

use std::fs;
use std::path::{Path, PathBuf};

use plantrelay::config::{Config, ConfigError, ConfigIssue, read_secret};

use crate::support::CONFIG_TABLES;

/// A valid config; tests append keys (which land in `sinks.https[0]`, the
/// last table) or whole tables.
const BASE: &str = r#"[agent]
id = "gw-test-01"
state_dir = "/var/lib/plantrelay"

[[sources.http]]
name = "mes"
listen = "127.0.0.1:8081"

[[sinks.https]]
name = "central"
url = "https://ingest.example.com/v1/events"
"#;

const MQTT_SOURCE: &str = r#"
[[sources.mqtt]]
name = "line3"
url = "mqtt://broker.plant.local:1883"
topics = ["machines/+/state", "mes/+/events"]
"#;

const OPCUA_SOURCE: &str = r#"
[[sources.opcua]]
name = "press-line-3"
endpoint = "opc.tcp://10.0.3.10:4840"

[[sources.opcua.nodes]]
node_id = "ns=2;s=Press07.State"
stream = "line3/press07"

[[sources.opcua.nodes]]
node_id = "ns=2;i=1001"
stream = "line3/press07"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("plantrelay.toml"))
}

fn issues(text: &str) -> Vec<ConfigIssue> {
    match parse(text) {
        Ok(_) => panic!("config was accepted:\n{text}"),
        Err(e) => e.issues,
    }
}

/// 1-based line of the first occurrence of `needle` after the first
/// occurrence of `after` (use "" to search from the start).
fn line_of(text: &str, after: &str, needle: &str) -> usize {
    let start = text.find(after).expect("anchor not in text");
    let at = start + text[start..].find(needle).expect("needle not in text");
    text[..at].matches('\n').count() + 1
}

/// Asserts that exactly this issue (key path, line, message fragment) is
/// among `issues`, and returns it.
#[track_caller]
fn assert_issue<'a>(
    issues: &'a [ConfigIssue],
    key_path: &str,
    line: Option<usize>,
    fragment: &str,
) -> &'a ConfigIssue {
    let found = issues.iter().find(|i| i.key_path == key_path);
    let Some(issue) = found else {
        panic!("no issue for `{key_path}` in {issues:#?}");
    };
    assert_eq!(issue.line, line, "line of `{key_path}`: {issue:#?}");
    assert!(
        issue.message.contains(fragment),
        "message of `{key_path}` lacks {fragment:?}: {:?}",
        issue.message
    );
    issue
}

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

// ---------------------------------------------------------- shipped files ---

#[test]
fn every_toml_file_in_the_config_directory_parses() {
    let mut checked = 0;
    for entry in fs::read_dir(config_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = fs::read_to_string(&path).unwrap();
            if let Err(e) = Config::parse(&text, &path) {
                panic!("{e}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 2, "only {checked} config files found");
}

#[test]
fn the_example_config_has_one_of_every_source_and_sink_kind() {
    let path = config_dir().join("plantrelay.example.toml");
    let config = Config::parse(&fs::read_to_string(&path).unwrap(), &path).unwrap();
    assert!(config.health.is_some());
    assert_eq!(config.source_names(), vec!["mes", "line3", "press-line-3"]);
    assert_eq!(
        config.sink_names(),
        vec!["central", "enterprise-broker", "datahub"]
    );
    assert_eq!(config.sources.opcua[0].nodes.len(), 2);
}

/// Each table of the example is probed with a bogus key; the error lists
/// every key that table accepts, and each must be shown in that table (set,
/// or commented out as `# key = ...`) under a comment line.
#[test]
fn the_example_config_shows_and_comments_every_key_of_every_table() {
    let path = config_dir().join("plantrelay.example.toml");
    let text = fs::read_to_string(path).unwrap();
    for &header in CONFIG_TABLES {
        let at = text.find(&format!("\n{header}\n")).expect(header) + 1;
        let probe = format!(
            "{}{header}\nzz_probe = 1\n{}",
            &text[..at],
            &text[at + header.len() + 1..]
        );
        let err = Config::parse(&probe, Path::new("probe.toml")).unwrap_err();
        let message = &err.issues[0].message;
        assert!(message.contains("unknown field `zz_probe`"), "{message}");
        let keys: Vec<&str> = message
            .split_once("expected")
            .unwrap()
            .1
            .split('`')
            .skip(1)
            .step_by(2)
            .collect();
        assert!(keys.len() >= 2, "{header}: {message}");

        let body_end = text[at + header.len()..]
            .find("\n[")
            .map_or(text.len(), |i| at + header.len() + i);
        let lines: Vec<&str> = text[at..body_end].lines().collect();
        let table = header.trim_matches(['[', ']']);
        for key in keys {
            if text.contains(&format!("\n[[{table}.{key}]]\n"))
                || text.contains(&format!("\n[{table}.{key}]\n"))
            {
                continue; // A nested table, probed on its own.
            }
            let shown = lines.iter().position(|l| {
                l.starts_with(&format!("{key} = ")) || l.starts_with(&format!("# {key} = "))
            });
            let Some(i) = shown else {
                panic!("{header}: key `{key}` is not shown in the example");
            };
            let above = lines[i - 1];
            assert!(
                above.starts_with('#') && !is_commented_out_key(above),
                "{header}: key `{key}` has no comment line above it"
            );
        }
    }
}

/// `# some_key = ...`: a key shown commented out, not a description.
fn is_commented_out_key(line: &str) -> bool {
    line.strip_prefix("# ")
        .and_then(|rest| rest.split_once(" = "))
        .is_some_and(|(key, _)| key.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
}

// ------------------------------------------------------------------- load ---

#[test]
fn load_resolves_relative_paths_against_the_config_directory() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("secrets")).unwrap();
    fs::write(dir.path().join("secrets/mes.token"), "mes-token\n").unwrap();
    fs::write(dir.path().join("secrets/central.token"), "central-token").unwrap();
    let text =
        BASE.replace(
            "state_dir = \"/var/lib/plantrelay\"",
            "state_dir = \"state\"",
        )
        .replace(
            "listen = \"127.0.0.1:8081\"",
            "listen = \"127.0.0.1:8081\"\ntoken_file = \"secrets/mes.token\"",
        ) + "token_file = \"secrets/central.token\"\n";
    let file = dir.path().join("plantrelay.toml");
    fs::write(&file, text).unwrap();

    let config = Config::load(&file).unwrap();

    assert_eq!(config.agent.state_dir, dir.path().join("state"));
    let mes_token = config.sources.http[0].token_file.as_ref().unwrap();
    assert_eq!(mes_token, &dir.path().join("secrets/mes.token"));
    assert!(mes_token.is_absolute());
    assert_eq!(read_secret(mes_token).unwrap(), "mes-token");
    let central_token = config.sinks.https[0].token_file.as_ref().unwrap();
    assert_eq!(read_secret(central_token).unwrap(), "central-token");
}

#[test]
fn load_reports_a_missing_secret_file_with_its_resolved_path_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{BASE}token_file = \"central.token\"\n");
    let file = dir.path().join("plantrelay.toml");
    fs::write(&file, &text).unwrap();

    let err = Config::load(&file).unwrap_err();

    let resolved = dir.path().join("central.token");
    let issue = assert_issue(
        &err.issues,
        "sinks.https[0].token_file",
        Some(line_of(&text, "", "token_file")),
        &resolved.display().to_string(),
    );
    assert!(issue.message.contains("No such file"), "{}", issue.message);
    assert_eq!(err.file, file);
    assert!(err.to_string().starts_with(&file.display().to_string()));
}

#[test]
fn load_refuses_a_state_dir_that_is_a_file_but_accepts_a_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("state"), "").unwrap();
    let text = BASE.replace("\"/var/lib/plantrelay\"", "\"state\"");
    let file = dir.path().join("plantrelay.toml");
    fs::write(&file, &text).unwrap();
    let err = Config::load(&file).unwrap_err();
    assert_issue(
        &err.issues,
        "agent.state_dir",
        Some(3),
        "exists but is not a directory",
    );

    fs::remove_file(dir.path().join("state")).unwrap();
    let config = Config::load(&file).unwrap();
    assert!(!config.agent.state_dir.exists(), "load must not create it");
}

#[test]
fn load_names_an_unreadable_config_file() {
    let err = Config::load(Path::new("/nonexistent/plantrelay.toml")).unwrap_err();
    assert_eq!(err.issues.len(), 1);
    assert!(
        err.to_string()
            .starts_with("/nonexistent/plantrelay.toml: cannot read config file"),
        "{err}"
    );
}

// ------------------------------------------------ deserialisation errors ---

#[test]
fn malformed_toml_names_its_line_column_and_likely_key() {
    let text = BASE.replace(
        "[[sinks.https]]",
        "[journal]\nmax_size = 2GiB\n\n[[sinks.https]]",
    );
    let issues = issues(&text);
    assert_eq!(issues.len(), 1, "{issues:#?}");
    let issue = assert_issue(
        &issues,
        "journal.max_size",
        Some(line_of(&text, "", "max_size")),
        "invalid TOML",
    );
    assert_eq!(issue.column, Some(12), "{issue:#?}");
}

#[test]
fn a_duplicate_key_is_a_syntax_error_on_the_second_key() {
    let text = format!("{BASE}name = \"again\"\n");
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sinks.https[0].name",
        Some(line_of(&text, "central", "name")),
        "duplicate key",
    );
}

#[test]
fn unknown_top_level_key_names_itself_and_its_line() {
    let text = format!("agnet = 1\n{BASE}");
    let issues = issues(&text);
    let issue = assert_issue(&issues, "agnet", Some(1), "unknown field `agnet`");
    assert!(
        issue.message.contains("did you mean `agent`?"),
        "{issue:#?}"
    );
    assert_eq!(issue.column, Some(1));
}

#[test]
fn unknown_nested_key_names_its_full_path_and_line() {
    let text = format!("{BASE}urll = \"https://other.example.com\"\n");
    let issues = issues(&text);
    let issue = assert_issue(
        &issues,
        "sinks.https[0].urll",
        Some(line_of(&text, "", "urll")),
        "unknown field `urll`",
    );
    assert!(issue.message.contains("did you mean `url`?"), "{issue:#?}");
}

#[test]
fn an_inline_secret_is_refused_with_a_hint_to_use_the_file_key() {
    let text = format!("{BASE}{MQTT_SOURCE}username = \"relay\"\npassword = \"hunter2\"\n");
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sources.mqtt[0].password",
        Some(line_of(&text, "", "password =")),
        "use `password_file`",
    );
}

#[test]
fn a_missing_required_key_points_at_its_table() {
    let text = BASE.replace("url = \"https://ingest.example.com/v1/events\"\n", "");
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sinks.https[0].url",
        Some(line_of(&text, "", "[[sinks.https]]")),
        "missing required key `url`",
    );
}

#[test]
fn a_value_of_the_wrong_type_names_the_key_and_line() {
    let text = format!("{BASE}batch_max_events = \"many\"\n");
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sinks.https[0].batch_max_events",
        Some(line_of(&text, "", "batch_max_events")),
        "invalid type: string \"many\"",
    );
}

#[test]
fn a_duration_without_a_unit_is_rejected_with_an_example() {
    let text = format!("{BASE}timeout = \"30\"\n");
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sinks.https[0].timeout",
        Some(line_of(&text, "", "timeout")),
        "invalid duration \"30\"",
    );
}

#[test]
fn a_duration_past_100_years_is_rejected_where_it_would_overflow_a_deadline() {
    // "Forever" written as the most seconds there are: `Instant + d` in the
    // journal's append would have ended the process at the first event.
    let text = BASE.replace(
        "[[sources.http]]",
        "[journal]\nblock_timeout = \"18446744073709551615s\"\n\n[[sources.http]]",
    );
    let found = issues(&text);
    assert_issue(
        &found,
        "journal.block_timeout",
        Some(line_of(&text, "", "block_timeout")),
        "invalid duration \"18446744073709551615s\": longer than 100 years",
    );
    // Two keys whose sum the JetStream check adds: each is refused alone.
    let text = format!("{BASE}retry_max = \"300000000000y\"\n");
    let found = issues(&text);
    assert_issue(
        &found,
        "sinks.https[0].retry_max",
        Some(line_of(&text, "", "retry_max")),
        "longer than 100 years",
    );
}

#[test]
fn a_zero_timeout_is_rejected() {
    let text = format!("{BASE}timeout = \"0s\"\n");
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sinks.https[0].timeout",
        Some(line_of(&text, "", "timeout")),
        "must be greater than zero",
    );
}

#[test]
fn a_duration_given_as_a_number_is_rejected() {
    let text = format!("{BASE}retry_max = 60\n");
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sinks.https[0].retry_max",
        Some(line_of(&text, "", "retry_max")),
        "expected a duration such as",
    );
}

#[test]
fn a_malformed_size_is_rejected_with_an_example() {
    let text = format!("{BASE}\n[journal]\nmax_size = \"lots\"\n");
    let issues = issues(&text);
    assert_issue(
        &issues,
        "journal.max_size",
        Some(line_of(&text, "", "max_size")),
        "invalid size \"lots\"",
    );
}

#[test]
fn dedup_max_ids_outside_its_range_is_rejected() {
    for (n, why) in [
        ("999", "must be at least 1000, got 999"),
        (
            "1000000000",
            "must be at most 100000000 (its index takes 12 bytes per id, allocated at start), got 1000000000",
        ),
    ] {
        let text = format!("{BASE}\n[journal]\ndedup_max_ids = {n}\n");
        let issues = issues(&text);
        assert_issue(
            &issues,
            "journal.dedup_max_ids",
            Some(line_of(&text, "", "dedup_max_ids")),
            why,
        );
    }
    let text = format!("{BASE}\n[journal]\ndedup_max_ids = 100000000\n");
    assert!(parse(&text).is_ok());
}

#[test]
fn commit_window_and_batch_linger_beyond_their_bounds_are_refused_by_name() {
    // The first line lands in the sink, the last table of BASE.
    let text = format!("{BASE}batch_linger = \"11s\"\n\n[journal]\ncommit_window = \"200ms\"\n");
    let issues = issues(&text);
    assert_issue(
        &issues,
        "journal.commit_window",
        Some(line_of(&text, "", "commit_window")),
        "between 0s and 100ms",
    );
    assert_issue(
        &issues,
        "sinks.https[0].batch_linger",
        Some(line_of(&text, "", "batch_linger")),
        "between 0s and 10s",
    );
}

#[test]
fn a_page_size_sqlite_cannot_use_is_refused_by_name() {
    for (value, shown) in [("3000", "3000"), ("512", "512"), ("\"128KiB\"", "131072")] {
        let text = format!("{BASE}\n[journal]\npage_size = {value}\n");
        let issues = issues(&text);
        assert_issue(
            &issues,
            "journal.page_size",
            Some(line_of(&text, "", "page_size")),
            &format!(
                "must be a power of two from 1024 to 65536 bytes (SQLite's page size), got {shown}"
            ),
        );
    }
    let text = format!("{BASE}\n[journal]\npage_size = \"2KiB\"\n");
    assert_eq!(parse(&text).unwrap().journal_options().page_size, 2048);
}

#[test]
fn a_malformed_url_names_the_key_and_line() {
    let text = BASE.replace("https://ingest.example.com/v1/events", "ingest.example.com");
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sinks.https[0].url",
        Some(line_of(&text, "", "url")),
        "invalid URL \"ingest.example.com\"",
    );
}

#[test]
fn a_host_name_as_listen_address_names_the_key_and_line() {
    let text = BASE.replace("127.0.0.1:8081", "localhost:8081");
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sources.http[0].listen",
        Some(line_of(&text, "", "listen")),
        "invalid listen address \"localhost:8081\"",
    );
}

#[test]
fn an_unknown_security_policy_lists_the_known_ones() {
    let text = format!("{BASE}{OPCUA_SOURCE}").replace(
        "endpoint = \"opc.tcp://10.0.3.10:4840\"",
        "endpoint = \"opc.tcp://10.0.3.10:4840\"\nsecurity_policy = \"Basic128Rsa15\"",
    );
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sources.opcua[0].security_policy",
        Some(line_of(&text, "", "security_policy")),
        "unknown variant `Basic128Rsa15`",
    );
    assert!(issues[0].message.contains("Aes128_Sha256_RsaOaep"));
}

#[test]
fn a_topic_qos_outside_0_to_2_names_the_entry_key() {
    let text = format!("{BASE}{MQTT_SOURCE}").replace(
        "\"mes/+/events\"]",
        "{ filter = \"mes/+/events\", qos = 3 }]",
    );
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sources.mqtt[0].topics[1].qos",
        Some(line_of(&text, "", "topics")),
        "invalid qos 3",
    );
}

#[test]
fn a_topic_table_with_an_unknown_key_is_reported_precisely() {
    let text = format!("{BASE}{MQTT_SOURCE}")
        .replace("\"mes/+/events\"]", "{ filtr = \"mes/+/events\" }]");
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sources.mqtt[0].topics[1].filtr",
        Some(line_of(&text, "", "topics")),
        "did you mean `filter`?",
    );
}

#[test]
fn a_deadband_with_both_kinds_is_rejected() {
    let text = format!("{BASE}{OPCUA_SOURCE}deadband = {{ absolute = 1, percent = 2 }}\n");
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sources.opcua[0].nodes[1].deadband",
        Some(line_of(&text, "", "deadband")),
        "exactly one of `absolute` or `percent`",
    );
}

#[test]
fn a_state_map_key_that_is_not_an_integer_is_rejected() {
    let text = format!("{BASE}{OPCUA_SOURCE}state_map = {{ \"0\" = \"off\", \"on\" = \"1\" }}\n");
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sources.opcua[0].nodes[1].state_map",
        Some(line_of(&text, "", "state_map")),
        "state_map key `on` is not an integer",
    );
}

// ------------------------------------------------------ semantic issues ---

#[test]
fn a_journal_smaller_than_16_mib_is_rejected() {
    let text = format!("{BASE}\n[journal]\nmax_size = \"8MiB\"\n");
    let issues = issues(&text);
    assert_issue(
        &issues,
        "journal.max_size",
        Some(line_of(&text, "", "max_size")),
        "at least 16MiB",
    );
    assert!(parse(&text.replace("8MiB", "16MiB")).is_ok());
}

#[test]
fn each_kind_accepts_only_its_own_url_schemes() {
    let text = format!(
        "{BASE}{MQTT_SOURCE}{OPCUA_SOURCE}\n\
         [[sinks.mqtt]]\nname = \"up\"\nurl = \"https://mqtt.example.com\"\n\n\
         [[sinks.jetstream]]\nname = \"hub\"\nurl = \"mqtt://nats.example.com:4222\"\n"
    )
    .replace(
        "mqtt://broker.plant.local:1883",
        "tcp://broker.plant.local:1883",
    )
    .replace("opc.tcp://10.0.3.10:4840", "http://10.0.3.10:4840")
    .replace(
        "https://ingest.example.com/v1/events",
        "http://ingest.example.com/v1/events",
    );
    let issues = issues(&text);
    let line = |needle: &str| Some(line_of(&text, "", needle));
    assert_issue(
        &issues,
        "sinks.https[0].url",
        line("http://ingest"),
        "needs allow_plain_http = true",
    );
    assert_issue(
        &issues,
        "sources.mqtt[0].url",
        line("tcp://broker"),
        "expected `mqtt://` or `mqtts://`",
    );
    assert_issue(
        &issues,
        "sources.opcua[0].endpoint",
        line("http://10.0.3.10"),
        "expected `opc.tcp://`",
    );
    assert_issue(
        &issues,
        "sinks.mqtt[0].url",
        line("https://mqtt"),
        "expected `mqtt://` or `mqtts://`",
    );
    assert_issue(
        &issues,
        "sinks.jetstream[0].url",
        line("mqtt://nats"),
        "expected `nats://` or `tls://`",
    );
    assert_eq!(issues.len(), 5, "{issues:#?}");
}

#[test]
fn plain_http_is_allowed_only_when_asked_for() {
    let text = BASE.replace("https://ingest", "http://ingest") + "allow_plain_http = true\n";
    assert!(parse(&text).is_ok());
}

#[test]
fn credentials_in_a_url_are_refused() {
    let text = BASE.replace("https://ingest", "https://user:secret@ingest");
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sinks.https[0].url",
        Some(line_of(&text, "", "url")),
        "credentials in URLs are not allowed",
    );
}

#[test]
fn duplicate_source_and_sink_names_are_reported_on_the_second_use() {
    let text = format!(
        "{BASE}{}\n[[sinks.jetstream]]\nname = \"central\"\nurl = \"nats://nats.example.com\"\n",
        MQTT_SOURCE.replace("\"line3\"", "\"mes\"")
    );
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sources.mqtt[0].name",
        Some(line_of(&text, "[[sources.mqtt]]", "name")),
        "duplicate source name `mes` (first used at sources.http[0].name)",
    );
    assert_issue(
        &issues,
        "sinks.jetstream[0].name",
        Some(line_of(&text, "[[sinks.jetstream]]", "name")),
        "duplicate sink name `central`",
    );
}

#[test]
fn a_source_name_with_a_space_is_rejected() {
    let text = BASE.replace("name = \"mes\"", "name = \"mes line\"");
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sources.http[0].name",
        Some(line_of(&text, "", "mes line")),
        "invalid character ' '",
    );
}

#[test]
fn a_config_without_sources_says_so_without_a_line() {
    let text = BASE.replace(
        "[[sources.http]]\nname = \"mes\"\nlisten = \"127.0.0.1:8081\"\n",
        "",
    );
    let err = parse(&text).unwrap_err();
    assert_issue(
        &err.issues,
        "sources",
        None,
        "at least one source is required",
    );
    assert_eq!(
        err.to_string(),
        "plantrelay.toml: sources: at least one source is required \
         ([[sources.http]], [[sources.mqtt]] or [[sources.opcua]])"
    );
}

#[test]
fn a_config_without_sinks_says_so() {
    let text = BASE.replace(
        "[[sinks.https]]\nname = \"central\"\nurl = \"https://ingest.example.com/v1/events\"\n",
        "",
    );
    let err = parse(&text).unwrap_err();
    assert_eq!(err.issues.len(), 1, "{err}");
    assert_issue(&err.issues, "sinks", None, "at least one sink is required");
    assert!(
        err.to_string()
            .starts_with("plantrelay.toml: sinks: at least one sink is required")
    );
}

#[test]
fn an_empty_sinks_table_is_pointed_at() {
    let text = BASE.replace(
        "[[sinks.https]]\nname = \"central\"\nurl = \"https://ingest.example.com/v1/events\"\n",
        "[sinks]\n",
    );
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sinks",
        Some(line_of(&text, "", "[sinks]")),
        "at least one sink is required",
    );
}

#[test]
fn a_malformed_node_id_names_the_node_and_line() {
    let text = format!("{BASE}{OPCUA_SOURCE}").replace("ns=2;i=1001", "ns=2;x=1001");
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sources.opcua[0].nodes[1].node_id",
        Some(line_of(&text, "", "ns=2;x=1001")),
        "invalid node id `ns=2;x=1001`",
    );
}

#[test]
fn a_security_policy_without_security_mode_is_a_mismatch() {
    let text = format!("{BASE}{OPCUA_SOURCE}").replace(
        "endpoint = \"opc.tcp://10.0.3.10:4840\"",
        "endpoint = \"opc.tcp://10.0.3.10:4840\"\nsecurity_policy = \"None\"\nsecurity_mode = \"Sign\"",
    );
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sources.opcua[0].security_mode",
        Some(line_of(&text, "", "security_mode")),
        "does not fit security_policy \"None\"",
    );
    // Defaults (Basic256Sha256 + SignAndEncrypt) fit; None + None fits.
    assert!(parse(&format!("{BASE}{OPCUA_SOURCE}")).is_ok());
    assert!(parse(&text.replace("\"Sign\"", "\"None\"")).is_ok());
}

#[test]
fn a_mode_of_none_with_a_real_policy_is_a_mismatch() {
    let text = format!("{BASE}{OPCUA_SOURCE}").replace(
        "endpoint = \"opc.tcp://10.0.3.10:4840\"",
        "endpoint = \"opc.tcp://10.0.3.10:4840\"\nsecurity_mode = \"None\"",
    );
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sources.opcua[0].security_mode",
        Some(line_of(&text, "", "security_mode")),
        "does not fit security_policy \"Basic256Sha256\"",
    );
}

#[test]
fn a_malformed_mqtt_filter_names_its_entry() {
    let text = format!("{BASE}{MQTT_SOURCE}").replace("mes/+/events", "mes/#/events");
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sources.mqtt[0].topics[1]",
        Some(line_of(&text, "", "topics")),
        "`#` must be the last level",
    );
}

#[test]
fn an_mqtt_source_needs_at_least_one_topic() {
    let text = format!("{BASE}{MQTT_SOURCE}").replace(
        "topics = [\"machines/+/state\", \"mes/+/events\"]",
        "topics = []",
    );
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sources.mqtt[0].topics",
        Some(line_of(&text, "", "topics")),
        "at least one topic filter",
    );
}

#[test]
fn json_pointers_with_a_non_json_format_are_rejected() {
    let text = format!("{BASE}{MQTT_SOURCE}format = \"raw\"\nid_pointer = \"/eventId\"\n");
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sources.mqtt[0].id_pointer",
        Some(line_of(&text, "", "id_pointer")),
        "only applies to format = \"json\"",
    );
}

#[test]
fn an_mqtt_stream_template_with_an_unknown_placeholder_is_rejected() {
    let text = format!("{BASE}{MQTT_SOURCE}stream = \"line3/{{machine}}\"\n");
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sources.mqtt[0].stream",
        Some(line_of(&text, "", "stream =")),
        "unknown placeholder `{machine}`",
    );
    assert!(parse(&text.replace("{machine}", "{2}")).is_ok());
}

#[test]
fn a_lifetime_count_below_three_keep_alives_is_rejected() {
    let text = format!("{BASE}{OPCUA_SOURCE}").replace(
        "endpoint = \"opc.tcp://10.0.3.10:4840\"",
        "endpoint = \"opc.tcp://10.0.3.10:4840\"\nkeep_alive_count = 20\nlifetime_count = 50",
    );
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sources.opcua[0].lifetime_count",
        Some(line_of(&text, "", "lifetime_count")),
        "at least 3 × keep_alive_count (60), got 50",
    );
    assert!(parse(&text.replace("= 50", "= 60")).is_ok());
}

#[test]
fn a_health_server_without_authentication_is_refused() {
    let health = "\n[health]\nlisten = \"0.0.0.0:8443\"\ntls_cert = \"/etc/plantrelay/tls/health.crt\"\ntls_key = \"/etc/plantrelay/tls/health.key\"\n";
    let text = format!("{BASE}{health}");
    let issues = issues(&text);
    assert_issue(
        &issues,
        "health.token_file",
        Some(line_of(&text, "", "[health]")),
        "no authentication configured: set token_file and/or client_ca, or allow_unauthenticated = true",
    );
    assert!(parse(&format!("{text}allow_unauthenticated = true\n")).is_ok());
    assert!(
        parse(&format!(
            "{text}client_ca = \"/etc/plantrelay/tls/ca.crt\"\n"
        ))
        .is_ok()
    );
}

#[test]
fn tls_cert_without_tls_key_is_reported_on_the_cert() {
    let text = BASE.replace(
        "listen = \"127.0.0.1:8081\"",
        "listen = \"127.0.0.1:8081\"\ntls_cert = \"/etc/plantrelay/tls/ingest.crt\"",
    );
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sources.http[0].tls_cert",
        Some(line_of(&text, "", "tls_cert")),
        "`tls_cert` is set but `tls_key` is not",
    );
}

#[test]
fn two_listeners_on_the_same_address_clash() {
    let text = format!("{BASE}\n[[sources.http]]\nname = \"mes2\"\nlisten = \"0.0.0.0:8081\"\n");
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sources.http[1].listen",
        Some(line_of(&text, "", "0.0.0.0:8081")),
        "clashes with sources.http[0].listen (127.0.0.1:8081)",
    );
}

#[test]
fn retry_max_below_retry_initial_is_rejected() {
    let text = format!("{BASE}retry_initial = \"10s\"\nretry_max = \"5s\"\n");
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sinks.https[0].retry_max",
        Some(line_of(&text, "", "retry_max")),
        "at least retry_initial",
    );
}

#[test]
fn ca_only_without_ca_file_is_rejected() {
    let text = format!("{BASE}ca_only = true\n");
    let issues = issues(&text);
    assert_issue(
        &issues,
        "sinks.https[0].ca_only",
        Some(line_of(&text, "", "ca_only")),
        "`ca_only` requires `ca_file`",
    );
}

#[test]
fn several_issues_in_one_file_are_all_reported_in_file_order() {
    let text = format!("{BASE}batch_max_events = 0\nca_only = true\n{MQTT_SOURCE}{OPCUA_SOURCE}")
        .replace("id = \"gw-test-01\"", "id = \"gw test\"")
        .replace("machines/+/state", "machines/+state")
        .replace("ns=2;i=1001", "ns=2;i=-1");
    let err = parse(&text).unwrap_err();
    let paths: Vec<&str> = err.issues.iter().map(|i| i.key_path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "agent.id",
            "sinks.https[0].batch_max_events",
            "sinks.https[0].ca_only",
            "sources.mqtt[0].topics[0]",
            "sources.opcua[0].nodes[1].node_id",
        ],
        "{err}"
    );
    let lines: Vec<usize> = err.issues.iter().map(|i| i.line.unwrap()).collect();
    assert_eq!(
        lines,
        vec![
            2,
            line_of(&text, "", "batch_max_events"),
            line_of(&text, "", "ca_only"),
            line_of(&text, "", "topics"),
            line_of(&text, "", "i=-1"),
        ]
    );
    let display = err.to_string();
    assert_eq!(display.lines().count(), 5, "{display}");
    assert!(
        display
            .lines()
            .next()
            .unwrap()
            .starts_with("plantrelay.toml:2:6: agent.id: invalid character ' '"),
        "{display}"
    );
}

fn stream_class_config(mqtt_class: &str, topics: &str, stream: &str) -> String {
    format!(
        r#"
[agent]
id = "gw"
state_dir = "/tmp/plantrelay-test"

[[sources.opcua]]
name = "press-line-3"
endpoint = "opc.tcp://10.0.3.10:4840"
class = "telemetry"

[[sources.opcua.nodes]]
node_id = "ns=2;s=Press07.State"
stream = "line3/press07"

[[sources.mqtt]]
name = "mes"
url = "mqtt://broker.plant.local:1883"
topics = {topics}
stream = "{stream}"
class = "{mqtt_class}"

[[sinks.https]]
name = "central"
url = "https://ingest.example.com/v1/events"
"#
    )
}

#[test]
fn sources_of_different_classes_that_can_produce_the_same_stream_are_refused() {
    for (topics, stream) in [
        (r#"["line3/+"]"#, "{topic}"),
        (r#"["plant/line3/+/events"]"#, "line3/{3}"),
        (r##"["#"]"##, "{topic}"),
        (r#"["mes/x"]"#, "line3/press07"),
    ] {
        let text = stream_class_config("critical", topics, stream);
        let found = issues(&text);
        let issue = found
            .iter()
            .find(|i| i.key_path == "sources.mqtt[0].stream")
            .unwrap_or_else(|| panic!("{topics} {stream}: {found:#?}"));
        assert!(
            issue.message.contains("sources.opcua[0]") && issue.message.contains("one class"),
            "{}",
            issue.message
        );
    }
}

#[test]
fn streams_that_cannot_meet_or_share_a_class_are_accepted() {
    for (class, topics, stream) in [
        ("critical", r#"["machines/+/state"]"#, "{topic}"),
        ("critical", r#"["line3/+"]"#, "mes/{2}"),
        ("critical", r#"["line3/press07/x"]"#, "{topic}"),
        ("telemetry", r#"["line3/+"]"#, "{topic}"),
    ] {
        let text = stream_class_config(class, topics, stream);
        if let Err(e) = parse(&text) {
            panic!("{class} {topics} {stream}: {:#?}", e.issues);
        }
    }
}

/// Every sink the annotated example configures is built (TLS material,
/// secrets and credentials loaded, nothing connected): copying the example
/// gives an agent whose every sink kind starts.
#[test]
fn every_sink_of_the_example_config_is_built() {
    use plantrelay::demo::receiver::EphemeralPki;
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    fs::create_dir_all(etc.join("tls")).unwrap();
    let pki = EphemeralPki::generate().unwrap();
    fs::create_dir_all(dir.path().join("pki")).unwrap();
    let paths = pki.write_to(&dir.path().join("pki")).unwrap();
    let text = fs::read_to_string(config_dir().join("plantrelay.example.toml"))
        .unwrap()
        .replace("/etc/plantrelay/", &format!("{}/", etc.display()))
        .replace(
            "/usr/share/plantrelay/schemas/",
            &format!("{}/", config_dir().join("schemas").display()),
        )
        .replace(
            "/var/lib/plantrelay",
            &dir.path().join("state").display().to_string(),
        );
    for line in text.lines() {
        let Some((_, value)) = line.split_once(" = \"") else {
            continue;
        };
        let Some(path) = value.strip_suffix('"') else {
            continue;
        };
        let Ok(rel) = Path::new(path).strip_prefix(&etc) else {
            continue;
        };
        let name = rel.to_string_lossy();
        let source = if name.ends_with("ca.crt") {
            Some(&paths.ca)
        } else if name.ends_with(".crt") {
            Some(&paths.client_cert)
        } else if name.ends_with(".key") {
            Some(&paths.client_key)
        } else {
            None
        };
        match source {
            Some(src) => {
                fs::copy(src, etc.join(rel)).unwrap();
            }
            None if name.ends_with(".creds") => {
                let seed = nkeys::KeyPair::new_user().seed().unwrap();
                fs::write(
                    etc.join(rel),
                    format!(
                        "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QifQ.e30.sig\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
                    ),
                )
                .unwrap();
            }
            None => fs::write(etc.join(rel), "s3cret-from-a-file\n").unwrap(),
        }
    }
    let path = dir.path().join("plantrelay.toml");
    fs::write(&path, &text).unwrap();
    let config = Config::load(&path).unwrap();
    plantrelay::tls::install_crypto_provider();
    let sinks = plantrelay::sinks::build(&config).unwrap();
    let kinds: Vec<&str> = sinks.iter().map(|c| c.kind).collect();
    assert_eq!(
        kinds.len(),
        config.sink_names().len(),
        "every sink of the example is built"
    );
    for kind in ["https", "mqtt", "jetstream"] {
        assert!(
            kinds.contains(&kind),
            "the example has a {kind} sink: {kinds:?}"
        );
    }
}

#[test]
fn a_broken_schema_is_reported_at_load_with_its_file_and_pointer() {
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("confirmation.v1.json");
    fs::write(
        &schema,
        r#"{"type":"object","properties":{"qty":{"type":"numbr"}}}"#,
    )
    .unwrap();
    let text = format!(
        "{BASE}\n[[schemas]]\ntype = \"com.acme.mes.confirmation.v1\"\nfile = \"confirmation.v1.json\"\n"
    );
    let file = dir.path().join("plantrelay.toml");
    fs::write(&file, &text).unwrap();
    let err = Config::load(&file).unwrap_err();
    let issue = assert_issue(
        &err.issues,
        "schemas[0].file",
        Some(line_of(&text, "[[schemas]]", "file")),
        &schema.display().to_string(),
    );
    assert!(
        issue.message.contains("at /properties/qty/type"),
        "{}",
        issue.message
    );

    // Fixed, it loads; the same type twice is refused.
    fs::write(&schema, r#"{"type":"object"}"#).unwrap();
    Config::load(&file).unwrap();
    let twice = format!(
        "{text}\n[[schemas]]\ntype = \"com.acme.mes.confirmation.v1\"\nfile = \"confirmation.v1.json\"\n"
    );
    fs::write(&file, &twice).unwrap();
    let err = Config::load(&file).unwrap_err();
    let line = twice[..twice.rfind("type =").unwrap()]
        .matches('\n')
        .count()
        + 1;
    assert_issue(
        &err.issues,
        "schemas[1].type",
        Some(line),
        "already has a schema (schemas[0])",
    );
}

#[test]
fn require_schema_without_any_schema_is_refused() {
    let text = BASE.replace(
        "listen = \"127.0.0.1:8081\"",
        "listen = \"127.0.0.1:8081\"\nrequire_schema = true",
    );
    assert_issue(
        &issues(&text),
        "sources.http[0].require_schema",
        Some(line_of(&text, "", "require_schema")),
        "no [[schemas]] entry",
    );
}

#[test]
fn oauth2_excludes_token_file_and_checks_its_url_and_scopes() {
    let text = format!(
        "{BASE}token_file = \"/etc/plantrelay/central.token\"\n\n[sinks.https.oauth2]\n\
         token_url = \"http://login.example.com/token\"\nclient_id = \"gw\"\n\
         client_secret_file = \"/etc/plantrelay/oauth2.secret\"\nscopes = [\"events.write read\"]\n"
    );
    let found = issues(&text);
    assert_issue(
        &found,
        "sinks.https[0].token_file",
        Some(line_of(&text, "", "token_file")),
        "exclude each other",
    );
    assert_issue(
        &found,
        "sinks.https[0].oauth2.token_url",
        Some(line_of(&text, "", "token_url")),
        "https",
    );
    assert_issue(
        &found,
        "sinks.https[0].oauth2.scopes[0]",
        Some(line_of(&text, "", "scopes")),
        "not a scope token",
    );
    let fine = format!(
        "{BASE}\n[sinks.https.oauth2]\ntoken_url = \"https://login.example.com/token\"\n\
         client_id = \"gw\"\nclient_secret_file = \"/etc/plantrelay/oauth2.secret\"\n\
         auth_method = \"post\"\n"
    );
    let config = parse(&fine).unwrap();
    let o = config.sinks.https[0].oauth2.as_ref().unwrap();
    assert_eq!(o.auth_method, plantrelay::config::OAuth2AuthMethod::Post);
    assert!(o.scopes.is_empty());
}
