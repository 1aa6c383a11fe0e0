"""`shardmesh certs DIR`: a local test CA and the certificates a mesh needs for (mutual) TLS.

    DIR/ca.pem, ca-key.pem            the CA (keep ca-key.pem to issue more; never deploy it)
    DIR/service.pem, service-key.pem  every service: serverAuth + clientAuth, SANs = --hosts
    DIR/client.pem, client-key.pem    a client of the router under mutual TLS: clientAuth only

ECDSA P-256 keys (fast to make, supported by gRPC), valid for `days` days. For tests and local
meshes: a production deployment brings certificates from its own PKI.
"""

import datetime
import ipaddress
import os
import pathlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shardmesh test CA"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _certificate(subject: str, key, issuer: x509.Name, issuer_key, days: int, *, ca: bool = False,
                 usages: list = (), hosts: list[str] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=False, crl_sign=False, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=True, encipher_only=False,
            decipher_only=False), critical=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                        critical=False)
    if hosts:
        builder = builder.add_extension(_san(list(hosts)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: pathlib.Path, stem: str, certificate: x509.Certificate, key) -> None:
    (directory / f"{stem}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path = directory / f"{stem}-key.pem"
    key_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never readable by others
    with os.fdopen(descriptor, "wb") as file:
        file.write(key_bytes)


def make_certs(directory: str | pathlib.Path, hosts: list[str] = DEFAULT_HOSTS, days: int = 30,
               ca_name: str = "shardmesh local CA") -> dict[str, pathlib.Path]:
    """Write a CA, a service certificate for `hosts` and a client certificate into `directory`;
    return the paths by role ("ca", "service", "service_key", "client", "client_key", "ca_key")."""
    if not hosts:
        raise ValueError("give at least one host name or IP address for the service certificate")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate(ca_name, ca_key, _name(ca_name), ca_key, days, ca=True)
    _write(directory, "ca", ca, ca_key)
    service_key = ec.generate_private_key(ec.SECP256R1())
    _write(directory, "service", _certificate("shardmesh service", service_key, ca.subject, ca_key, days,
                                              usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                                              hosts=hosts), service_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    _write(directory, "client", _certificate("shardmesh client", client_key, ca.subject, ca_key, days,
                                             usages=[ExtendedKeyUsageOID.CLIENT_AUTH]), client_key)
    return {"ca": directory / "ca.pem", "ca_key": directory / "ca-key.pem",
            "service": directory / "service.pem", "service_key": directory / "service-key.pem",
            "client": directory / "client.pem", "client_key": directory / "client-key.pem"}


def run(args) -> int:
    """`shardmesh certs DIR [--hosts ...] [--days N]`."""
    paths = make_certs(args.dir, [h for h in args.hosts.replace(" ", "").split(",") if h], args.days)
    print(f"wrote a test CA and certificates to {args.dir}/ (keys readable by you only)")
    print(f"  services:  --tls-cert {paths['service']} --tls-key {paths['service_key']} --tls-ca {paths['ca']}")
    print(f"  clients:   --tls-ca {paths['ca']} --tls-cert {paths['client']} --tls-key {paths['client_key']}")
    return 0
