//! README.md cannot rot: every line of its `bash` blocks runs here, in
//! order, through the real `drover` binary, and every `json` block is a task
//! line that `drover run` accepts.
//!
//! The setup is what a reader has: a directory holding the repository's
//! `examples/`, and `drover` on `PATH`. `cargo run --release --bin drover --`
//! stands for `drover` (the same binary, built here in the test profile). A
//! line ending in `&` starts a service that the next lines use; it is
//! waited for (its `--port` answers) and stopped at the end of its block.
//! The README's fixed ports are swapped for free ones, so the test does not
//! depend on them being free.

mod common;

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::drover_bin;

/// Lines not run here, and why.
const NOT_RUN: &[(&str, &str)] = &[(
    "cargo test --workspace",
    "it is the test suite this test is part of",
)];

/// The ports the README uses, each replaced by a free one.
const README_PORTS: &[&str] = &["9123", "9097"];

/// Longest any one README command may take; only guards against a hang.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// The fenced blocks of `text` whose info string is `lang`, as their lines.
fn blocks(text: &str, lang: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in text.lines() {
        let fence = line.trim_start().starts_with("```");
        match (&mut current, fence) {
            (None, true) if line.trim() == format!("```{lang}") => current = Some(Vec::new()),
            (Some(_), true) => out.push(current.take().unwrap_or_default()),
            (Some(lines), false) if !line.trim().is_empty() => lines.push(line.to_string()),
            _ => {}
        }
    }
    out
}

fn free_port() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port().to_string()
}

/// The command a README line runs, and whether it goes to the background.
fn command_of(line: &str) -> (String, bool) {
    let code = match line.find(" #") {
        Some(i) => &line[..i],
        None => line,
    }
    .trim();
    let background = code.ends_with('&');
    let code = code.trim_end_matches('&').trim();
    let code = match code.strip_prefix("cargo run --release --bin drover --") {
        Some(rest) => format!("drover{rest}"),
        None => code.to_string(),
    };
    (code, background)
}

struct Scratch {
    dir: tempfile::TempDir,
    path_var: String,
    ports: Vec<(&'static str, String)>,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::tempdir().expect("scratch dir");
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let examples = dir.path().join("examples");
        std::fs::create_dir_all(&examples).unwrap();
        for e in std::fs::read_dir(repo.join("examples")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), examples.join(e.file_name())).unwrap();
        }
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(drover_bin(), bin.join("drover")).unwrap();
        let path_var = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let ports = README_PORTS.iter().map(|p| (*p, free_port())).collect();
        Scratch {
            dir,
            path_var,
            ports,
        }
    }

    fn shell(&self, command: &str) -> Command {
        let mut command = command.to_string();
        for (from, to) in &self.ports {
            command = command.replace(from, to);
        }
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("exec {command}"))
            .current_dir(self.dir.path())
            .env("PATH", &self.path_var)
            .env("DROVER_CACHE_DIR", self.dir.path().join("cache"))
            .stdin(Stdio::null());
        cmd
    }

    /// The port a service line listens on, after substitution.
    fn port_of(&self, command: &str) -> Option<String> {
        let words: Vec<&str> = command.split_whitespace().collect();
        let i = words.iter().position(|w| *w == "--port")?;
        let port = words.get(i + 1)?;
        Some(
            self.ports
                .iter()
                .find(|(from, _)| from == port)
                .map(|(_, to)| to.clone())
                .unwrap_or_else(|| port.to_string()),
        )
    }
}

fn wait_with_timeout(mut child: Child, what: &str) -> Output {
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`{what}` did not finish within {COMMAND_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("collect output")
}

fn wait_for_port(port: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(format!("127.0.0.1:{port}")).is_err() {
        assert!(
            Instant::now() < deadline,
            "`{what}` never listened on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops the services a block started; one that already ended must have
/// ended well.
fn stop(services: Vec<(String, Child)>) {
    for (what, mut child) in services {
        match child.try_wait().expect("try_wait") {
            Some(status) => assert!(status.success(), "`{what}` ended with {status}"),
            None => {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("read README.md")
}

#[test]
fn every_bash_line_of_the_readme_runs() {
    let scratch = Scratch::new();
    let mut ran = 0;
    for block in blocks(&readme(), "bash") {
        let mut services = Vec::new();
        for line in &block {
            let (command, background) = command_of(line);
            if command.is_empty() {
                continue;
            }
            if NOT_RUN.iter().any(|(c, _)| *c == command) {
                continue;
            }
            eprintln!("$ {command}");
            let mut cmd = scratch.shell(&command);
            if background {
                let child = cmd
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start sh");
                if let Some(port) = scratch.port_of(&command) {
                    wait_for_port(&port, &command);
                }
                services.push((command, child));
                continue;
            }
            let child = cmd
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start sh");
            let out = wait_with_timeout(child, &command);
            assert!(
                out.status.success(),
                "README command `{command}` failed ({}):\n--- stdout\n{}--- stderr\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            ran += 1;
        }
        stop(services);
    }
    assert!(
        ran >= 10,
        "only {ran} README commands found; is the parser broken?"
    );
}

#[test]
fn every_json_block_of_the_readme_is_one_runnable_task_line() {
    let scratch = Scratch::new();
    let jsons = blocks(&readme(), "json");
    assert!(!jsons.is_empty(), "README shows no JSON task line");
    for block in jsons {
        assert_eq!(
            block.len(),
            1,
            "a JSON task line must be one line: {block:?}"
        );
        std::fs::write(
            scratch.dir.path().join("task.txt"),
            format!("{}\n", block[0]),
        )
        .unwrap();
        let child = scratch
            .shell("drover run task.txt --cores 1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sh");
        let out = wait_with_timeout(child, "drover run task.txt");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_parser_finds_blocks_and_commands() {
    let text = "x\n```bash\ndrover a   # note\n\ndrover b &\n```\n```text\nno\n```\n";
    let b = blocks(text, "bash");
    assert_eq!(b, vec![vec!["drover a   # note", "drover b &"]]);
    assert_eq!(command_of(&b[0][0]), ("drover a".into(), false));
    assert_eq!(command_of(&b[0][1]), ("drover b".into(), true));
    assert_eq!(
        command_of("cargo run --release --bin drover -- run x.txt"),
        ("drover run x.txt".into(), false)
    );
}
