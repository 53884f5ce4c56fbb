//! README.md is the operator's guide: its configuration reference must list
//! exactly the keys the config types accept, with the defaults the annotated
//! example states, and its first commands must stay the two a newcomer runs.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use plantrelay::config::Config;

use crate::support::CONFIG_TABLES as TABLES;

fn read(relative: &str) -> String {
    fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)).unwrap()
}

/// The keys a table accepts, from the config types themselves: a bogus key
/// is put into the table and serde's "unknown field, expected one of" error
/// lists them. Nested tables (`nodes`, `oauth2`) are left out.
fn accepted_keys(example: &str, header: &str) -> Vec<String> {
    let at = example.find(&format!("\n{header}\n")).expect(header) + 1;
    let probe = format!(
        "{}{header}\nzz_probe = 1\n{}",
        &example[..at],
        &example[at + header.len() + 1..]
    );
    let err = Config::parse(&probe, Path::new("probe.toml")).unwrap_err();
    let message = &err.issues[0].message;
    assert!(message.contains("unknown field `zz_probe`"), "{message}");
    let table = header.trim_matches(['[', ']']);
    message
        .split_once("expected")
        .unwrap()
        .1
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|key| {
            !example.contains(&format!("\n[[{table}.{key}]]\n"))
                && !example.contains(&format!("\n[{table}.{key}]\n"))
        })
        .map(str::to_owned)
        .collect()
}

/// Key → default as the example's comments state it: the text after
/// `Default: ` up to the end of the comment (without the final period), or
/// `required` for a key whose comment says `Required.`. First occurrence of
/// the table only.
fn example_defaults(example: &str, header: &str) -> BTreeMap<String, String> {
    let at = example.find(&format!("\n{header}\n")).expect(header) + 1 + header.len();
    let body_end = example[at..].find("\n[").map_or(example.len(), |i| at + i);
    let mut out = BTreeMap::new();
    let mut comment = String::new();
    for line in example[at..body_end].lines() {
        let (is_comment, text) = match line.strip_prefix('#') {
            Some(rest) => (true, rest.trim()),
            None => (false, line.trim()),
        };
        let key = text
            .split_once(" = ")
            .map(|(k, _)| k)
            .filter(|k| !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
        match key {
            Some(key) if !comment.is_empty() => {
                let default = if comment.contains("Required.") {
                    "required".to_owned()
                } else {
                    let (_, d) = comment
                        .split_once("Default: ")
                        .unwrap_or_else(|| panic!("{header} {key}: no default in {comment:?}"));
                    d.trim_end_matches('.').to_owned()
                };
                out.insert(key.to_owned(), default);
                comment.clear();
            }
            Some(_) => {}
            None if is_comment => {
                if !comment.is_empty() {
                    comment.push(' ');
                }
                comment.push_str(text);
            }
            None => comment.clear(),
        }
    }
    out
}

/// Key → default cell of the README's reference table for `header`.
fn readme_table(readme: &str, header: &str) -> BTreeMap<String, String> {
    let reference = &readme[readme
        .find("\n## Configuration reference\n")
        .expect("README has no '## Configuration reference'")..];
    let heading = format!("\n### `{header}`\n");
    let at = reference
        .find(&heading)
        .unwrap_or_else(|| panic!("README reference has no {heading:?}"))
        + heading.len();
    let mut rows = BTreeMap::new();
    for line in reference[at..]
        .lines()
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| l.starts_with('|'))
        .skip(2)
    {
        // Split on unescaped pipes only.
        let cells: Vec<String> = line
            .replace("\\|", "\u{0}")
            .split('|')
            .map(|c| c.trim().replace('\u{0}', "|"))
            .collect();
        let key = cells[1].trim_matches('`').to_owned();
        let default = cells[2].replace('`', "");
        assert!(
            rows.insert(key.clone(), default).is_none(),
            "{header}: key `{key}` twice in the README"
        );
    }
    rows
}

#[test]
fn the_configuration_reference_lists_every_key_of_every_table_and_nothing_else() {
    let example = read("config/plantrelay.example.toml");
    let readme = read("README.md");
    for header in TABLES {
        let mut accepted = accepted_keys(&example, header);
        accepted.sort();
        let documented: Vec<String> = readme_table(&readme, header).into_keys().collect();
        assert_eq!(
            documented, accepted,
            "README reference for {header} (left) vs the keys the config accepts (right)"
        );
    }
}

#[test]
fn the_configuration_reference_states_the_defaults_of_the_annotated_example() {
    let example = read("config/plantrelay.example.toml");
    let readme = read("README.md");
    for header in TABLES {
        let documented = readme_table(&readme, header);
        for (key, default) in example_defaults(&example, header) {
            assert_eq!(
                documented.get(&key),
                Some(&default),
                "{header} {key}: README default vs the example's comment"
            );
        }
    }
}

#[test]
fn the_readme_opens_with_the_demo_and_the_test_command() {
    let readme = read("README.md");
    let first_block = readme
        .split("```")
        .nth(1)
        .expect("README has no code block");
    assert!(
        first_block.contains("cargo run --release -- demo")
            && first_block.contains("cargo test --locked"),
        "the first code block of README.md must hold the two commands:\n{first_block}"
    );
}

#[test]
fn the_readme_has_every_runbook() {
    let readme = read("README.md");
    for heading in [
        "### WAN outage",
        "### Journal full",
        "### Dead letters",
        "### Replay",
        "### Certificate rotation",
        "### OPC UA server certificate trust",
        "### Corrupt journal",
        "## Upgrade notes",
        "## Install from the Debian package",
    ] {
        assert!(
            readme.contains(&format!("\n{heading}\n")),
            "README has no {heading:?}"
        );
    }
}
