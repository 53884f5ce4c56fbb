//! The manual page `plantrelay(1)`, rendered from the clap command tree so it
//! cannot drift from `--help`.
//!
//! One page for the whole program, not one per subcommand: an operator types
//! `man plantrelay` (the unit's `Documentation=` points there) and searches
//! it for `replay` or `dead-letters`. clap_mangen renders one command per
//! page and points its SUBCOMMANDS section at `plantrelay-<sub>(1)` pages;
//! so this module uses its section renderers for the top level and for each
//! subcommand, and puts every subcommand (depth first, hidden ones left
//! out) under one COMMANDS section with its synopsis and options. FILES,
//! ENVIRONMENT, EXIT STATUS and SEE ALSO are written here.

use std::io::{self, Write};

use roff::{Roff, bold, italic, roman};

/// Writes the roff source of `plantrelay(1)` for `cmd` (the top-level
/// command: `Cli::command()` in the binary).
pub fn render(cmd: clap::Command, out: &mut dyn Write) -> io::Result<()> {
    let mut cmd = cmd.disable_help_subcommand(true);
    // Gives every subcommand its full bin name ("plantrelay journal stats")
    // and propagates the global arguments.
    cmd.build();
    let mut doc: Vec<u8> = Vec::new();
    let top = clap_mangen::Man::new(cmd.clone())
        .title(cmd.get_name().to_uppercase())
        .date(build_date());
    top.render_title(&mut doc)?;
    top.render_name_section(&mut doc)?;
    top.render_synopsis_section(&mut doc)?;
    top.render_description_section(&mut doc)?;
    top.render_options_section(&mut doc)?;

    doc.extend_from_slice(b".SH COMMANDS\n");
    let mut path = vec![cmd.get_name().to_owned()];
    for sub in visible_subcommands(&cmd) {
        render_command(sub, &mut path, &mut doc)?;
    }
    fixed_sections().to_writer(&mut doc)?;

    // Every roff chunk starts with the same two-line preamble (it defines
    // the apostrophe string); the page needs it once, before `.TH`.
    let text = String::from_utf8_lossy(&doc);
    let mut titled = false;
    for line in text.lines() {
        let preamble = line.starts_with(".ie \\n(.g .ds Aq") || line.starts_with(".el .ds Aq");
        if titled && preamble {
            continue;
        }
        titled |= line.starts_with(".TH ");
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// The subcommands shown: neither hidden nor clap's own `help`.
fn visible_subcommands(cmd: &clap::Command) -> impl Iterator<Item = &clap::Command> {
    cmd.get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
}

/// One subcommand under `.SS plantrelay <path>`: its long description, its
/// synopsis and its own options (the global ones are described once, at the
/// top). Then its subcommands, recursively.
fn render_command(
    cmd: &clap::Command,
    path: &mut Vec<String>,
    out: &mut dyn Write,
) -> io::Result<()> {
    path.push(cmd.get_name().to_owned());
    let title = path.join(" ");
    let own = cmd.clone().mut_args(|a| {
        if a.is_global_set() || matches!(a.get_id().as_str(), "help" | "version") {
            a.hide(true)
        } else {
            a
        }
    });
    let man = clap_mangen::Man::new(own.clone());

    let mut head = Roff::new();
    head.control("SS", [title.as_str()]);
    head.to_writer(out)?;
    write_body(|w| man.render_description_section(w), out)?;
    let mut synopsis = Roff::new();
    synopsis.control("PP", []).text([italic("Usage:")]);
    synopsis.to_writer(out)?;
    write_body(|w| man.render_synopsis_section(w), out)?;
    if own.get_arguments().any(|a| !a.is_hide_set()) {
        write_body(|w| man.render_options_section(w), out)?;
    }
    if cmd.get_subcommands().next().is_some() {
        let mut list = Roff::new();
        list.control("PP", []).text([roman(format!(
            "Commands: {}.",
            visible_subcommands(cmd)
                .map(|s| format!("{title} {}", s.get_name()))
                .collect::<Vec<_>>()
                .join(", ")
        ))]);
        list.to_writer(out)?;
    }
    for sub in visible_subcommands(cmd) {
        render_command(sub, path, out)?;
    }
    path.pop();
    Ok(())
}

/// Renders a clap_mangen section and writes it without its `.SH` heading
/// line, so that it becomes the body of a subcommand's `.SS`.
fn write_body(
    render: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    out: &mut dyn Write,
) -> io::Result<()> {
    let mut buf = Vec::new();
    render(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    for line in text.lines().filter(|l| !l.starts_with(".SH ")) {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// The sections that are not in the clap tree.
fn fixed_sections() -> Roff {
    let mut r = Roff::new();
    r.control("SH", ["FILES"]);
    for (file, what) in [
        (
            "/etc/plantrelay/plantrelay.toml",
            "The configuration (TOML). Check it with plantrelay check-config -c FILE.",
        ),
        (
            "/var/lib/plantrelay/journal.db",
            "The journal (SQLite, WAL mode) under state_dir. A damaged journal is moved aside \
             to journal.db.corrupt-<utc time> at start.",
        ),
        (
            "/usr/share/doc/plantrelay/",
            "README.md (the operator's guide) and plantrelay.example.toml (every key with its default).",
        ),
        (
            "/usr/lib/systemd/system/plantrelay.service",
            "The systemd unit (Type=notify, watchdog, ExecReload sends SIGHUP).",
        ),
    ] {
        r.control("TP", []).text([bold(file)]).text([roman(what)]);
    }

    r.control("SH", ["ENVIRONMENT"]);
    r.control("TP", [])
        .text([bold("PLANTRELAY_LOG")])
        .text([roman(
            "Log filter, e.g. \"info,plantrelay=debug\"; wins over RUST_LOG. Default: info.",
        )]);
    r.control("TP", [])
        .text([bold("RUST_LOG")])
        .text([roman("Log filter, used when PLANTRELAY_LOG is not set.")]);
    r.control("TP", []).text([bold("NO_COLOR")]).text([roman(
        "When set and not empty, no colours in text logs (there are none off a terminal anyway).",
    )]);
    r.control("TP", [])
        .text([bold("NOTIFY_SOCKET")])
        .text([roman(
            "Set by systemd: run sends READY=1, WATCHDOG=1, STATUS= and STOPPING=1 to it.",
        )]);

    r.control("SH", ["SIGNALS"]);
    r.text([roman(
        "run: SIGTERM or SIGINT starts a graceful shutdown; a second one exits at once with status 1. \
         SIGHUP reloads the health listener's TLS certificates (a failed reload keeps the old ones).",
    )]);

    r.control("SH", ["EXIT STATUS"]);
    r.control("TP", [])
        .text([bold("0")])
        .text([roman("Success (status: the agent is healthy).")]);
    r.control("TP", []).text([bold("1")]).text([roman(
        "Failure at run time (status: the agent is degraded).",
    )]);
    r.control("TP", []).text([bold("2")]).text([roman(
        "Bad config or usage; the message names file:line:col and the key path \
         (status: unreachable, TLS failure or unauthorised).",
    )]);

    r.control("SH", ["SEE ALSO"]);
    r.text([
        bold("systemctl"),
        roman("(1), "),
        bold("systemd.service"),
        roman("(5), /usr/share/doc/plantrelay/README.md"),
    ]);
    r
}

/// The page date: `SOURCE_DATE_EPOCH` when set (reproducible builds), else
/// empty (man shows none).
fn build_date() -> String {
    date_of(std::env::var("SOURCE_DATE_EPOCH").ok().as_deref())
}

/// The date of a `SOURCE_DATE_EPOCH` value, or none for one that is not a
/// time humantime can format (it panics before 1970 and past 9999).
fn date_of(epoch: Option<&str>) -> String {
    epoch
        .and_then(|s| s.parse::<u64>().ok())
        .and_then(|secs| std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(secs)))
        .and_then(crate::units::if_formattable)
        .map(|t| {
            let stamp = humantime::format_rfc3339(t).to_string();
            stamp.get(..10).unwrap_or_default().to_owned()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_date_follows_source_date_epoch_within_what_formats() {
        assert_eq!(date_of(Some("1765152000")), "2025-12-08");
        assert_eq!(date_of(None), "");
        assert_eq!(date_of(Some("soon")), "");
        // Past 9999, and past what a SystemTime holds.
        assert_eq!(date_of(Some("253402300800")), "");
        assert_eq!(date_of(Some("18446744073709551615")), "");
    }
}
