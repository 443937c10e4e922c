//! `scaletest`: how much Postgres load chatcache takes off coderd's chat streams.
//! See `chatcache_bench` for what one run does.

use std::process::ExitCode;
use std::time::Duration;

use chatcache_bench::options::{Options, Params};
use chatcache_bench::run::{self, RunNames};
use chatcache_bench::{postgres, procs};
use clap::Parser;

fn main() -> ExitCode {
    let options = Options::parse();
    if let Some(path) = &options.replot {
        return match run::replot(path) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("scaletest: {e}");
                ExitCode::from(2)
            }
        };
    }
    let deadline = match Params::resolve(&options) {
        Ok(params) => Duration::from_secs(params.run_deadline_s),
        Err(e) => {
            eprintln!("scaletest: {e}");
            return ExitCode::from(2);
        }
    };

    // Children die with us, whatever way we go: panic, error, signal or deadline.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        procs::kill_all();
        default_hook(info);
    }));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("scaletest: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };

    let names = RunNames::now();
    let outcome = runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return Err("cannot install signal handlers".to_owned());
        };
        tokio::select! {
            result = run::run(&options, &names) => result.map_err(|e| e.to_string()),
            _ = term.recv() => Err("stopped by SIGTERM".to_owned()),
            _ = int.recv() => Err("interrupted".to_owned()),
            _ = tokio::time::sleep(deadline) => {
                Err(format!("ran past its {} s deadline", deadline.as_secs()))
            }
        }
    });
    procs::kill_all();

    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("scaletest: the chatcache mode did not run clean; see the verdicts above");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("scaletest: {e}");
            if !options.keep {
                let dropped = runtime.block_on(postgres::drop_database(&names.db));
                if dropped.is_ok() {
                    eprintln!("scaletest: dropped database {}", names.db);
                }
            }
            ExitCode::from(2)
        }
    }
}
