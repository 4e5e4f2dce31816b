//! `balancer completions SHELL` and `balancer manpage`: generated from the clap parser itself
//! (clap_complete, clap_mangen), so a package's completions and manual never drift from the
//! real command line. Part of the binary (`mod packaging` in main.rs), not of the library.

use std::io::{self, Write};
use std::process::ExitCode;

use clap::Command;
use clap_mangen::Man;

/// Prints the completion script for `shell`.
pub fn completions(mut cmd: Command, shell: clap_complete::Shell) -> ExitCode {
    // Generated into memory: clap_complete panics when its writer fails, and a closed or full
    // stdout must not make a panic.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "balancer", &mut script);
    write_stdout(&script, "the completion script")
}

/// Prints the manual page.
pub fn manpage(cmd: Command) -> ExitCode {
    match render_manpage(cmd) {
        Ok(page) => write_stdout(&page, "the manual page"),
        Err(e) => {
            eprintln!("error: cannot render the manual page: {e}");
            ExitCode::from(1)
        }
    }
}

/// One page for the whole command. clap_mangen's own SUBCOMMANDS section points at
/// `balancer-check(1)` and friends, pages that a single stdout stream cannot ship; so each
/// subcommand gets a subsection here instead, with its synopsis, description and options.
fn render_manpage(cmd: Command) -> io::Result<Vec<u8>> {
    // `help` as a subcommand is clap's, not ours: leave it out of the manual.
    let mut cmd = cmd.disable_help_subcommand(true);
    // Sets each subcommand's bin name ("balancer check") and propagates global options.
    cmd.build();
    let man = Man::new(cmd.clone());
    let mut page = Vec::new();
    // The title keeps roff's apostrophe preamble; every later piece is rendered without it.
    man.render_title(&mut page)?;
    page.extend(section(|w| man.render_name_section(w))?);
    page.extend(section(|w| man.render_synopsis_section(w))?);
    page.extend(section(|w| man.render_description_section(w))?);
    page.extend(section(|w| man.render_options_section(w))?);
    page.extend(b".SH COMMANDS\n");
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = sub.get_bin_name().unwrap_or_else(|| sub.get_name());
        page.extend(format!(".SS \"{name}\"\n").as_bytes());
        let sub_man = Man::new(sub.clone());
        page.extend(body(|w| sub_man.render_synopsis_section(w))?);
        page.extend(b".PP\n");
        page.extend(body(|w| sub_man.render_description_section(w))?);
        if sub.get_arguments().any(|a| !a.is_hide_set()) {
            page.extend(body(|w| sub_man.render_options_section(w))?);
        }
    }
    page.extend(EXTRA.as_bytes());
    page.extend(section(|w| man.render_version_section(w))?);
    Ok(page)
}

/// What a man page reader looks for and clap does not know: signals and files. Kept to what
/// the contract states and the binary does; the README has the details.
const EXTRA: &str = r#".SH SIGNALS
.TP
\fBSIGHUP\fR
Reload the configuration file. A file that fails validation is rejected whole and the
running configuration keeps serving.
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Stop accepting, let in\-flight requests finish within \fIshutdown_grace\fR, exit 0.
A second signal exits at once with status 1.
.SH FILES
.TP
\fIbalancer.toml\fR
The configuration, read from the working directory unless \fB\-\-config\fR names
another file; \fBbalancer check\fR validates it without serving.
.SH "SEE ALSO"
The README and docs/configuration.md in the source distribution.
"#;

/// The roff that `render` writes, without the apostrophe preamble that each of clap_mangen's
/// `render_*` calls repeats (defined once, by the title).
fn section(render: impl FnOnce(&mut Vec<u8>) -> io::Result<()>) -> io::Result<Vec<u8>> {
    const PREAMBLE: &[u8] = b".ie \\n(.g .ds Aq \\(aq\n.el .ds Aq '\n";
    let mut buf = Vec::new();
    render(&mut buf)?;
    Ok(match buf.strip_prefix(PREAMBLE) {
        Some(rest) => rest.to_vec(),
        None => buf,
    })
}

/// `section` without its `.SH` heading (and with any other heading demoted to plain text
/// flow), for use inside a subcommand's `.SS`.
fn body(render: impl FnOnce(&mut Vec<u8>) -> io::Result<()>) -> io::Result<Vec<u8>> {
    let text = section(render)?;
    let mut out = Vec::with_capacity(text.len());
    for line in text.split_inclusive(|&b| b == b'\n') {
        if !line.starts_with(b".SH ") {
            out.extend_from_slice(line);
        }
    }
    Ok(out)
}

fn write_stdout(bytes: &[u8], what: &str) -> ExitCode {
    let mut out = io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader stopped reading (`| head`): what a SIGPIPE death would be, minus the noise.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write {what}: {e}");
            ExitCode::from(1)
        }
    }
}
