//! `tweed`: the CNI plugin binary. Everything is in the library; this only wires the process.

use std::io::{Read, Write};

fn main() {
    let mut stdin = Vec::new();
    let reply = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => tweed_cni::main(|k| std::env::var(k).ok(), &stdin),
        Err(e) => tweed_cni::main(|k| std::env::var(k).ok(), &[]).with_stdin_error(e),
    };
    if let Some(out) = &reply.stdout {
        let mut o = std::io::stdout().lock();
        let _ = o.write_all(out.as_bytes());
        let _ = o.write_all(b"\n");
        let _ = o.flush();
        if reply.code != 0 {
            // For people reading a runtime's log: the same error, once, on stderr.
            eprintln!("tweed: {out}");
        }
    }
    std::process::exit(reply.code);
}

trait WithStdinError {
    fn with_stdin_error(self, e: std::io::Error) -> tweed_cni::Reply;
}

impl WithStdinError for tweed_cni::Reply {
    fn with_stdin_error(self, e: std::io::Error) -> tweed_cni::Reply {
        let err = tweed_cni::error::Error::Stdin(e);
        tweed_cni::Reply {
            stdout: Some(
                tweed_cni::error::ErrorDoc::new(tweed_cni::version::LATEST, &err).to_json(),
            ),
            code: 1,
        }
    }
}
