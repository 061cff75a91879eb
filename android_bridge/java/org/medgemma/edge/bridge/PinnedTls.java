package org.medgemma.edge.bridge;

import java.security.GeneralSecurityException;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.security.cert.Certificate;
import java.security.cert.CertificateException;
import java.security.cert.X509Certificate;
import java.util.Locale;

import javax.net.ssl.HostnameVerifier;
import javax.net.ssl.HttpsURLConnection;
import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLPeerUnverifiedException;
import javax.net.ssl.SSLSession;
import javax.net.ssl.SSLSocketFactory;
import javax.net.ssl.TrustManager;
import javax.net.ssl.X509TrustManager;

/**
 * TLS pinned to one certificate: the clinic server's self-signed one (serve --lan).
 *
 * <p>The pin is the SHA-256 of the server's DER certificate (64 hex characters, as the server
 * prints it, in its endpoint file, its health and its page; any case, ':' separators allowed).
 * The trust manager accepts exactly that leaf certificate and refuses every other one, CA-signed
 * or not, with a {@link CertificateException} naming both fingerprints. The certificate is made
 * for an IP address and signed by no CA, so the host name is not checked against it: the pin
 * stands in for it (the verifier checks the session's certificate against the pin once more).
 * Both are set on each connection of the client that holds them, never process-wide.
 */
final class PinnedTls {
    private final byte[] pin;
    final String fingerprint; // 64 lowercase hex
    final SSLSocketFactory socketFactory;
    final HostnameVerifier hostnameVerifier;

    PinnedTls(String fingerprint) {
        this.fingerprint = normalize(fingerprint);
        this.pin = fromHex(this.fingerprint);
        final X509TrustManager trust = new PinTrustManager();
        try {
            SSLContext ctx = SSLContext.getInstance("TLS");
            ctx.init(null, new TrustManager[] {trust}, null);
            this.socketFactory = ctx.getSocketFactory();
        } catch (GeneralSecurityException e) {
            throw new IllegalStateException("this JVM has no TLS: " + e.getMessage(), e);
        }
        this.hostnameVerifier = new HostnameVerifier() {
            public boolean verify(String host, SSLSession session) {
                try {
                    Certificate[] chain = session.getPeerCertificates();
                    return chain.length > 0 && MessageDigest.isEqual(sha256(chain[0].getEncoded()), pin);
                } catch (SSLPeerUnverifiedException e) {
                    return false;
                } catch (CertificateException e) {
                    return false;
                }
            }
        };
    }

    /** Puts the pin on one connection (its socket factory and host name check). */
    void apply(HttpsURLConnection conn) {
        conn.setSSLSocketFactory(socketFactory);
        conn.setHostnameVerifier(hostnameVerifier);
    }

    /**
     * A fingerprint as a person gives it (any case, ':' separators, spaces around) → 64 lowercase
     * hex characters.
     *
     * @throws IllegalArgumentException not the 32 bytes of a SHA-256 in hex.
     */
    static String normalize(String fingerprint) {
        if (fingerprint == null) {
            throw new IllegalArgumentException("no certificate fingerprint given (the server prints it at start)");
        }
        String hex = fingerprint.replace(":", "").trim().toLowerCase(Locale.ROOT);
        boolean ok = hex.length() == 64;
        for (int i = 0; ok && i < hex.length(); i++) {
            char c = hex.charAt(i);
            ok = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
        }
        if (!ok) {
            throw new IllegalArgumentException(
                "a certificate fingerprint is 64 hex characters (SHA-256 of the server's DER certificate, "
                    + "':' separators allowed), not " + hex.length() + " characters of that: copy it from the "
                    + "server's start-up line, endpoint file or page");
        }
        return hex;
    }

    static byte[] sha256(byte[] data) {
        try {
            return MessageDigest.getInstance("SHA-256").digest(data);
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException("this JVM has no SHA-256", e);
        }
    }

    static String toHex(byte[] bytes) {
        StringBuilder sb = new StringBuilder(bytes.length * 2);
        for (byte b : bytes) {
            sb.append(Character.forDigit((b >> 4) & 0xf, 16)).append(Character.forDigit(b & 0xf, 16));
        }
        return sb.toString();
    }

    private static byte[] fromHex(String hex) {
        byte[] out = new byte[hex.length() / 2];
        for (int i = 0; i < out.length; i++) {
            out[i] = (byte) Integer.parseInt(hex.substring(2 * i, 2 * i + 2), 16);
        }
        return out;
    }

    /** Accepts exactly the pinned leaf certificate; this side never presents one. */
    private final class PinTrustManager implements X509TrustManager {
        public void checkServerTrusted(X509Certificate[] chain, String authType) throws CertificateException {
            if (chain == null || chain.length == 0) {
                throw new CertificateException("the server sent no certificate; pinned " + fingerprint);
            }
            byte[] seen = sha256(chain[0].getEncoded());
            if (!MessageDigest.isEqual(seen, pin)) {
                throw new CertificateException(
                    "the server's certificate is not the pinned one (server sha256 " + toHex(seen) + ", pinned "
                        + fingerprint + "): a different server, or its certificate was made anew; not connecting. "
                        + "Check the fingerprint the server shows, and pair again if it changed");
            }
        }

        public void checkClientTrusted(X509Certificate[] chain, String authType) throws CertificateException {
            throw new CertificateException("this client trusts no client certificates");
        }

        public X509Certificate[] getAcceptedIssuers() {
            return new X509Certificate[0];
        }
    }
}
