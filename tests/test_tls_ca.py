"""The interception CA (`sbg ca init`, `load_ca`) and the PEM helpers."""

from __future__ import annotations

import datetime
import io
import os
import stat

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID
from twisted.trial.unittest import SynchronousTestCase

from sbg.commands.ca_init import run as ca_init
from sbg.config.certificates import not_valid_after, not_valid_before
from sbg.tls.ca import CAError, init_ca, load_ca
from sbg.tls.pem import (
    PemError,
    certificate_expiry,
    load_certificates,
    load_private_key,
)
from testbed.tlstools import issue_cert, load_cert, make_ca


class InitCATests(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = self.mktemp()

    def test_creates_files_and_parents(self) -> None:
        directory = os.path.join(self.base, "a", "b", "ca")
        cert_path, key_path = init_ca(directory)
        self.assertEqual(cert_path, os.path.join(directory, "ca.crt"))
        self.assertEqual(key_path, os.path.join(directory, "ca.key"))
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)
        # The directory holding the key is not readable by others either.
        self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode) & 0o077, 0)

    def test_certificate_profile(self) -> None:
        cert_path, key_path = init_ca(self.base)
        cert = load_cert(cert_path)
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.assertIsInstance(key.curve, ec.SECP256R1)
        # The certificate is self-signed by this key.
        pub = cert.public_key()
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        self.assertEqual(pub.public_numbers(), key.public_key().public_numbers())
        pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
        self.assertEqual(cert.issuer, cert.subject)

        bc = cert.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS)
        self.assertTrue(bc.critical)
        self.assertTrue(bc.value.ca)
        ku = cert.extensions.get_extension_for_oid(ExtensionOID.KEY_USAGE)
        self.assertTrue(ku.critical)
        self.assertTrue(ku.value.key_cert_sign)
        self.assertTrue(ku.value.crl_sign)
        ski = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_KEY_IDENTIFIER)
        self.assertEqual(
            ski.value.digest,
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest,
        )
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        self.assertTrue(str(cn).startswith("sbg interception CA "), cn)
        now = datetime.datetime.now(datetime.UTC)
        self.assertLess(not_valid_before(cert), now)
        lifetime = not_valid_after(cert) - now
        self.assertGreater(lifetime, datetime.timedelta(days=3650))
        self.assertLess(lifetime, datetime.timedelta(days=3660))

    def test_two_runs_make_different_keys(self) -> None:
        a = load_ca(*init_ca(os.path.join(self.base, "a")))
        b = load_ca(*init_ca(os.path.join(self.base, "b")))
        self.assertNotEqual(a.ski, b.ski)

    def test_refuses_existing_key(self) -> None:
        _, key_path = init_ca(self.base)
        with open(key_path, "rb") as f:
            before = f.read()
        os.unlink(os.path.join(self.base, "ca.crt"))
        e = self.assertRaises(CAError, init_ca, self.base)
        self.assertIn("already exists", str(e))
        with open(key_path, "rb") as f:
            self.assertEqual(f.read(), before)
        # Nothing new was written either.
        self.assertFalse(os.path.exists(os.path.join(self.base, "ca.crt")))

    def test_refuses_existing_certificate(self) -> None:
        os.makedirs(self.base)
        with open(os.path.join(self.base, "ca.crt"), "w") as f:
            f.write("keep me")
        self.assertRaises(CAError, init_ca, self.base)
        self.assertFalse(os.path.exists(os.path.join(self.base, "ca.key")))
        with open(os.path.join(self.base, "ca.crt")) as f:
            self.assertEqual(f.read(), "keep me")


class CACommandTests(SynchronousTestCase):
    def test_success_prints_paths_and_hints(self) -> None:
        directory = os.path.join(self.mktemp(), "ca")
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(ca_init(directory, out, err), 0)
        text = out.getvalue()
        self.assertIn(os.path.join(directory, "ca.crt"), text)
        self.assertIn(os.path.join(directory, "ca.key"), text)
        self.assertIn("federation_custom_ca_list", text)
        self.assertIn("outbound:", text)
        self.assertEqual(err.getvalue(), "")

    def test_existing_key_is_one_error_line(self) -> None:
        directory = self.mktemp()
        self.assertEqual(ca_init(directory, io.StringIO(), io.StringIO()), 0)
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(ca_init(directory, out, err), 1)
        self.assertEqual(len(err.getvalue().splitlines()), 1)
        self.assertIn("ca.key already exists", err.getvalue())
        self.assertEqual(out.getvalue(), "")

    def test_uncreatable_directory_is_one_error_line(self) -> None:
        blocker = self.mktemp()
        with open(blocker, "w") as f:
            f.write("a file, not a directory")
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(ca_init(os.path.join(blocker, "ca"), out, err), 1)
        self.assertEqual(len(err.getvalue().splitlines()), 1)
        self.assertIn("cannot create", err.getvalue())


class LoadCATests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()

    def test_loads_what_init_wrote(self) -> None:
        cert_path, key_path = init_ca(self.dir)
        ca = load_ca(cert_path, key_path)
        self.assertEqual(ca.certificate, load_cert(cert_path))
        self.assertTrue(ca.self_signed)
        self.assertEqual(ca.chain, ())
        ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        self.assertEqual(ca.ski, ski.value.digest)

    def test_mismatched_key(self) -> None:
        a = make_ca(self.dir, "A", "a")
        b = make_ca(self.dir, "B", "b")
        e = self.assertRaises(CAError, load_ca, a.certificate, b.private_key)
        self.assertIn("does not belong", str(e))

    def test_leaf_certificate_is_not_a_ca(self) -> None:
        root = make_ca(self.dir)
        leaf = issue_cert(root, self.dir, "leaf", ["hs.test"])
        e = self.assertRaises(CAError, load_ca, leaf.certificate, leaf.private_key)
        self.assertIn("not a CA", str(e))

    def test_missing_file_names_the_path(self) -> None:
        missing = os.path.join(self.dir, "nope.crt")
        e = self.assertRaises(CAError, load_ca, missing, missing)
        self.assertIn(missing, str(e))

    def test_expired_ca(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=10))
            .not_valid_after(now - datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        os.makedirs(self.dir)
        cert_path, key_path = os.path.join(self.dir, "c"), os.path.join(self.dir, "k")
        with open(cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(key_path, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        e = self.assertRaises(CAError, load_ca, cert_path, key_path)
        self.assertIn("expired", str(e))

    def test_intermediate_with_chain(self) -> None:
        root = make_ca(self.dir, "root", "root")
        inter = make_ca(self.dir, "intermediate", "inter", parent=root)
        bundle = os.path.join(self.dir, "bundle.crt")
        with open(bundle, "wb") as out:
            for path in (inter.certificate, root.certificate):
                with open(path, "rb") as f:
                    out.write(f.read())
        ca = load_ca(bundle, inter.private_key)
        self.assertFalse(ca.self_signed)
        self.assertEqual(ca.certificate, load_cert(inter.certificate))
        self.assertEqual(ca.chain, (load_cert(root.certificate),))


class PemTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()

    def test_every_certificate_in_file_order(self) -> None:
        a = make_ca(self.dir, "A", "a")
        b = make_ca(self.dir, "B", "b")
        both = os.path.join(self.dir, "both.pem")
        with open(both, "wb") as out:
            for path in (b.certificate, a.certificate):
                with open(path, "rb") as f:
                    out.write(b"# comment between blocks\n" + f.read())
        certs = load_certificates(both)
        self.assertEqual(certs, [load_cert(b.certificate), load_cert(a.certificate)])

    def test_no_certificate(self) -> None:
        os.makedirs(self.dir)
        path = os.path.join(self.dir, "empty.pem")
        with open(path, "w") as f:
            f.write("nothing here\n")
        e = self.assertRaises(PemError, load_certificates, path)
        self.assertIn(path, str(e))

    def test_encrypted_key_is_refused_with_a_clear_message(self) -> None:
        os.makedirs(self.dir)
        key = ec.generate_private_key(ec.SECP256R1())
        path = os.path.join(self.dir, "enc.key")
        with open(path, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.BestAvailableEncryption(b"secret"),
                )
            )
        e = self.assertRaises(PemError, load_private_key, path)
        self.assertIn("encrypted", str(e))

    def test_validity_is_timezone_aware(self) -> None:
        cert = load_cert(make_ca(self.dir).certificate)
        after = not_valid_after(cert)
        self.assertEqual(after.utcoffset(), datetime.timedelta(0))
        self.assertLess(not_valid_before(cert), after)

    def test_certificate_expiry_is_the_earliest_in_the_file(self) -> None:
        root = make_ca(self.dir)  # 10 days
        leaf = issue_cert(root, self.dir, "leaf", ["hs.test"], with_chain=True)  # 5 days
        expiry = certificate_expiry(leaf.certificate)
        self.assertEqual(expiry, not_valid_after(load_cert(leaf.certificate)))
        self.assertLess(expiry, certificate_expiry(root.certificate))
        self.assertIsNotNone(expiry.tzinfo)
