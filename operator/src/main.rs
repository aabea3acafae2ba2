//! `operator`: the mailrelay Kubernetes operator and its offline tools.
//!
//! - `operator render -f <files/dirs>` compiles policy YAML offline (GitOps pre-merge check).
//! - `operator crds [--write <dir>]` prints or writes the generated CustomResourceDefinitions.
//! - `operator run` runs the controller (see [`mailrelay_operator::run`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use mailrelay_operator::{render, run};

#[derive(Parser, Debug)]
#[command(
    name = "operator",
    version,
    about = "mailrelay operator and policy tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Compile policy YAML offline and print the ConfigMap and Secret the operator would apply.
    Render(render::RenderArgs),
    /// Run the operator: watch the mailrelay resources and apply the compiled policy.
    Run(Box<run::RunArgs>),
    /// Print the CustomResourceDefinitions, or write one file per kind into a directory.
    Crds {
        #[arg(long)]
        write: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Render(args) => render::run(&args),
        Command::Run(args) => run::main(*args),
        Command::Crds { write } => crds(write),
    };
    match result {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn crds(write: Option<PathBuf>) -> anyhow::Result<i32> {
    use anyhow::Context as _;
    use mailrelay_crds::api::{crd_manifests, crd_yaml};
    // Serialise every CRD before writing any, so a failure leaves the directory as it was.
    let manifests = crd_manifests()
        .into_iter()
        .map(|(file, crd)| {
            crd_yaml(&crd)
                .map(|yaml| (file, yaml))
                .with_context(|| format!("serialising the CustomResourceDefinition for {file}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for (file, yaml) in manifests {
        match &write {
            Some(dir) => {
                let path = dir.join(file);
                std::fs::write(&path, yaml)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            None => print!("---\n{yaml}"),
        }
    }
    Ok(0)
}
