//! X.509 credentials for TLS tests, made with `openssl` as a site would (README: *Migration
//! over TLS*): a CA, a server certificate for the names a destination is reached by, a client
//! certificate for a source, in the layout QEMU's `tls-creds-x509` reads.

use std::io;
use std::path::Path;
use std::process::Command;

fn openssl(args: &[&str], dir: &Path) -> io::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Writes into `dir` a CA (`ca-cert.pem`, `ca-key.pem`, named `ca_name`), a server certificate
/// and key for `server_names` (`server-cert.pem`, `server-key.pem`; IP addresses and DNS names
/// alike) and a client certificate and key (`client-cert.pem`, `client-key.pem`), both signed
/// by that CA: the directory QEMU's `tls-creds-x509` takes at either end.
pub fn site_credentials(dir: &Path, ca_name: &str, server_names: &[&str]) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let subject = format!("/CN={ca_name}");
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "3650",
            "-subj",
            &subject,
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        dir,
    )?;
    let sans: Vec<String> = server_names
        .iter()
        .map(|n| {
            if n.parse::<std::net::IpAddr>().is_ok() {
                format!("IP:{n}")
            } else {
                format!("DNS:{n}")
            }
        })
        .collect();
    let peers = [
        (
            "server",
            server_names.first().copied().unwrap_or("server"),
            "serverAuth",
            sans.join(","),
        ),
        (
            "client",
            "ninja-source",
            "clientAuth",
            "DNS:ninja-source".to_owned(),
        ),
    ];
    for (role, name, usage, san) in peers {
        let ext = format!("{role}.ext");
        std::fs::write(
            dir.join(&ext),
            format!(
                "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage={usage}\nsubjectAltName={san}\n"
            ),
        )?;
        let (key, csr, cert) = (
            format!("{role}-key.pem"),
            format!("{role}.csr"),
            format!("{role}-cert.pem"),
        );
        openssl(
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &key,
                "-out",
                &csr,
            ],
            dir,
        )?;
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-days",
                "825",
                "-extfile",
                &ext,
                "-out",
                &cert,
            ],
            dir,
        )?;
    }
    Ok(())
}
