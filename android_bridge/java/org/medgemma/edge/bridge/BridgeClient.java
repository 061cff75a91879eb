package org.medgemma.edge.bridge;

import java.io.BufferedReader;
import java.io.ByteArrayOutputStream;
import java.io.File;
import java.io.FileInputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.InputStreamReader;
import java.io.OutputStream;
import java.net.HttpURLConnection;
import java.net.MalformedURLException;
import java.net.URL;
import java.security.cert.CertificateException;
import java.util.ArrayList;
import java.util.List;
import java.util.UUID;

import javax.net.ssl.HttpsURLConnection;
import javax.net.ssl.SSLException;
import javax.net.ssl.SSLPeerUnverifiedException;

import org.json.JSONException;
import org.json.JSONObject;

/**
 * Client for the medgemma-edge bridge (protocol v1) over loopback HTTP, or HTTPS to a clinic
 * server.
 *
 * <p>Java 8 level, {@link HttpURLConnection} and org.json only, so the same source builds for
 * Android and for a desktop JVM. Each request is one {@code POST /v1/rpc}; its replies arrive as
 * JSON lines and are handed to a {@link Listener} as they come: events, then a result or an
 * error, then exactly one {@code done}. {@link #stream} blocks the calling thread: call it from a
 * worker thread, never from Android's main thread. {@link #cancel} (from any thread) ends the
 * target stream with {@code done} whose finish_reason is {@code cancelled}.
 *
 * <p>A clinic server ({@code serve --lan}) is reached with {@link #lan}: HTTPS pinned to the
 * server's certificate fingerprint (see {@link PinnedTls}) and this device's token, which
 * {@link #pair} obtains once from a pairing code. There a generation that finds MedGemma busy
 * waits its turn: its listener first gets {@code queued} events ({@link Queued#of}), and
 * {@link #cancel} takes it out of the line (it ends with {@code done(cancelled)}). A device's
 * request ids are its own: its cancel reaches its own requests only. A token the server no
 * longer knows (revoked) gets HTTP 401, the error {@code unauthorized}: pair again.
 */
public final class BridgeClient {
    public static final int PROTOCOL_VERSION = 1;

    /** Receives the replies of one request, in order, on the thread that called stream(). */
    public interface Listener {
        void onEvent(JSONObject event) throws JSONException;

        void onResult(JSONObject result) throws JSONException;

        void onError(String code, String message, JSONObject error) throws JSONException;

        void onDone(JSONObject done) throws JSONException;
    }

    /** An error reply turned into an exception by {@link #call}. */
    public static final class BridgeException extends Exception {
        private static final long serialVersionUID = 1L;
        public final String code;
        public final double retryAfter;

        public BridgeException(String code, String message, double retryAfter) {
            super(code + ": " + message);
            this.code = code;
            this.retryAfter = retryAfter;
        }
    }

    /**
     * A {@code queued} event: the generation waits for MedGemma on a clinic server.
     * {@code position} counts the generations ahead of it, the running one included (1: next);
     * {@code estimatedWaitS} is the server's estimate in seconds. Sent on enqueue and whenever
     * the position changes; a generation that runs at once gets none.
     */
    public static final class Queued {
        public final int position;
        public final double estimatedWaitS;

        public Queued(int position, double estimatedWaitS) {
            this.position = position;
            this.estimatedWaitS = estimatedWaitS;
        }

        /** The queued event in {@code event} (as given to {@link Listener#onEvent}), or null. */
        public static Queued of(JSONObject event) throws JSONException {
            if (!"queued".equals(event.optString("event"))) {
                return null;
            }
            return new Queued(event.getInt("position"), event.getDouble("estimated_wait_s"));
        }
    }

    /**
     * What {@link #pair} returns: the server's URL and pinned fingerprint, this device's token and
     * its id on the server. The app keeps it ({@link #toJson}) in its private storage (the token
     * is this device's credential: never log it) and makes its client from it ({@link #client}).
     */
    public static final class Pairing {
        public final String url;
        public final String fingerprint;
        public final String token;
        public final String deviceId;

        public Pairing(String url, String fingerprint, String token, String deviceId) {
            this.url = url;
            this.fingerprint = fingerprint;
            this.token = token;
            this.deviceId = deviceId;
        }

        /** A client of the server as this device ({@link BridgeClient#lan}). */
        public BridgeClient client() {
            return lan(url, fingerprint, token);
        }

        /** {@code {"url", "fingerprint", "token", "device_id"}}: what the app stores. */
        public JSONObject toJson() throws JSONException {
            JSONObject o = new JSONObject();
            o.put("url", url);
            o.put("fingerprint", fingerprint);
            o.put("token", token);
            o.put("device_id", deviceId);
            return o;
        }

        /** The pairing {@link #toJson} stored. */
        public static Pairing fromJson(JSONObject o) throws JSONException {
            return new Pairing(o.getString("url"), o.getString("fingerprint"), o.getString("token"), o.getString("device_id"));
        }
    }

    private static final int MAX_PAIR_REPLY = 64 << 10;

    private final String baseUrl;
    private final String token;
    private final PinnedTls tls; // null: loopback HTTP
    private int connectTimeoutMs = 10000;
    private int readTimeoutMs = 0; // generation can take minutes; 0 = no timeout

    public BridgeClient(String baseUrl, String token) {
        this(baseUrl, token, null);
    }

    private BridgeClient(String baseUrl, String token, PinnedTls tls) {
        this.baseUrl = baseUrl.endsWith("/") ? baseUrl.substring(0, baseUrl.length() - 1) : baseUrl;
        this.token = token;
        this.tls = tls;
    }

    /**
     * A client of a clinic server ({@code serve --lan}) over its LAN.
     *
     * @param url the server's {@code https://HOST:PORT}
     * @param fingerprint the server's certificate fingerprint (64 hex, any case, ':' allowed)
     * @param token this device's token, from {@link #pair}
     * @throws IllegalArgumentException a URL that is not https, a malformed fingerprint, no token
     */
    public static BridgeClient lan(String url, String fingerprint, String token) {
        if (token == null || token.trim().isEmpty()) {
            throw new IllegalArgumentException("no device token: pair the device first (BridgeClient.pair)");
        }
        return new BridgeClient(checkHttps(url), token, new PinnedTls(fingerprint));
    }

    /**
     * Pairs this device with a clinic server: {@code POST /v1/pair} with the pairing code the
     * server's admin gave (8 digits, single use, valid a few minutes), over TLS pinned to
     * {@code fingerprint} (the code is sent only once the server's certificate matched it).
     * Returns this device's {@link Pairing}: keep it, and make the client with
     * {@link Pairing#client}.
     *
     * @throws BridgeException the server refused: {@code unauthorized} (a wrong, expired or
     *     already used code: ask for a new one), {@code invalid_request} (a bad device name)
     * @throws SSLPeerUnverifiedException the server's certificate is not the pinned one (its
     *     message names both fingerprints); nothing was sent
     * @throws IOException no connection
     * @throws IllegalArgumentException a URL that is not https, a malformed fingerprint
     */
    public static Pairing pair(String url, String fingerprint, String code, String deviceName)
        throws IOException, JSONException, BridgeException {
        BridgeClient client = new BridgeClient(checkHttps(url), null, new PinnedTls(fingerprint));
        JSONObject body = new JSONObject();
        body.put("code", code);
        body.put("device", deviceName);
        client.setTimeouts(10000, 60000);
        HttpURLConnection conn = client.open("/v1/pair", body.toString(), "application/json");
        try {
            int status = conn.getResponseCode();
            InputStream in = status >= 400 ? conn.getErrorStream() : conn.getInputStream();
            if (in == null) { // a 401 to a streamed POST: the JVM drops its body
                throw new BridgeException(statusCode(status), status == 401
                    ? "wrong, expired or already used pairing code; ask for a new one" : statusMessage(status), 0);
            }
            String text = new String(readAtMost(in, MAX_PAIR_REPLY), "UTF-8");
            JSONObject reply;
            try {
                reply = new JSONObject(text);
            } catch (JSONException e) {
                throw new BridgeException("http_" + status, "the pairing reply is not JSON", 0);
            }
            JSONObject err = reply.optJSONObject("error");
            if (status != 200 || err != null) {
                String errCode = err == null ? "http_" + status : err.optString("code", "http_" + status);
                double retry = err == null ? 0 : err.optDouble("retry_after", 0);
                throw new BridgeException(errCode, err == null ? "HTTP " + status : err.optString("message"), retry);
            }
            // the fingerprint kept is the one this handshake checked, whatever the reply says
            return new Pairing(client.baseUrl, client.tls.fingerprint, reply.getString("token"), reply.getString("device_id"));
        } finally {
            conn.disconnect();
        }
    }

    /**
     * Reads the endpoint file that {@code medgemma-edge serve} writes (url and token; with
     * {@code serve --lan} also the fingerprint, and the client is pinned to it).
     */
    public static BridgeClient fromEndpointFile(File file) throws IOException, JSONException {
        InputStream in = new FileInputStream(file);
        try {
            JSONObject ep = new JSONObject(new String(readAll(in), "UTF-8"));
            if (ep.has("fingerprint")) {
                return lan(ep.getString("url"), ep.getString("fingerprint"), ep.getString("token"));
            }
            return new BridgeClient(ep.getString("url"), ep.getString("token"));
        } finally {
            in.close();
        }
    }

    /** The pinned certificate fingerprint (64 lowercase hex), or null for a loopback client. */
    public String fingerprint() {
        return tls == null ? null : tls.fingerprint;
    }

    public BridgeClient setTimeouts(int connectMs, int readMs) {
        this.connectTimeoutMs = connectMs;
        this.readTimeoutMs = readMs;
        return this;
    }

    /** A fresh request id. */
    public static String newId() {
        return "java-" + UUID.randomUUID().toString();
    }

    /** {@code {"v": 1, "id": id, "op": op, "params": params}}. */
    public static JSONObject request(String id, String op, JSONObject params) throws JSONException {
        JSONObject req = new JSONObject();
        req.put("v", PROTOCOL_VERSION);
        req.put("id", id);
        req.put("op", op);
        req.put("params", params == null ? new JSONObject() : params);
        return req;
    }

    /** Sends one request and streams its replies to the listener. Returns the HTTP status. */
    public int stream(JSONObject request, Listener listener) throws IOException, JSONException {
        return streamRaw(request.toString(), listener);
    }

    /** Like {@link #stream} with the body as given (tests use it to send malformed JSON). */
    public int streamRaw(String body, Listener listener) throws IOException, JSONException {
        HttpURLConnection conn = open("/v1/rpc", body, "application/x-ndjson");
        try {
            int status = conn.getResponseCode();
            InputStream in = status >= 400 ? conn.getErrorStream() : conn.getInputStream();
            if (in == null) { // a 401 to a streamed POST: the JVM drops its body
                listener.onError(statusCode(status), statusMessage(status), null);
                return status;
            }
            BufferedReader reader = new BufferedReader(new InputStreamReader(in, "UTF-8"));
            try {
                String line;
                while ((line = reader.readLine()) != null) {
                    if (line.trim().isEmpty()) {
                        continue;
                    }
                    JSONObject msg = new JSONObject(line);
                    if (!msg.has("type")) { // 401/413 bodies are plain JSON errors, not protocol replies
                        JSONObject err = msg.optJSONObject("error");
                        String code = err == null ? "http_" + status : err.optString("code", "http_" + status);
                        listener.onError(code, err == null ? "" : err.optString("message"), err);
                        break;
                    }
                    String type = msg.getString("type");
                    if ("event".equals(type)) {
                        listener.onEvent(msg);
                    } else if ("result".equals(type)) {
                        listener.onResult(msg.getJSONObject("result"));
                    } else if ("error".equals(type)) {
                        JSONObject err = msg.getJSONObject("error");
                        listener.onError(err.getString("code"), err.optString("message"), err);
                    } else if ("done".equals(type)) {
                        listener.onDone(msg);
                        break;
                    }
                }
            } finally {
                reader.close();
            }
            return status;
        } finally {
            conn.disconnect();
        }
    }

    /** Sends one request and returns every reply line (the transcript tests use this). */
    public List<JSONObject> replies(String body, int[] statusOut) throws IOException, JSONException {
        final List<JSONObject> out = new ArrayList<JSONObject>();
        HttpURLConnection conn = open("/v1/rpc", body, "application/x-ndjson");
        try {
            int status = conn.getResponseCode();
            if (statusOut != null) {
                statusOut[0] = status;
            }
            InputStream in = status >= 400 ? conn.getErrorStream() : conn.getInputStream();
            if (in == null) { // a 401 to a streamed POST: the JVM drops its body
                out.add(new JSONObject().put("error", new JSONObject().put("code", statusCode(status))
                    .put("message", statusMessage(status))));
                return out;
            }
            BufferedReader reader = new BufferedReader(new InputStreamReader(in, "UTF-8"));
            String line;
            while ((line = reader.readLine()) != null) {
                if (!line.trim().isEmpty()) {
                    out.add(new JSONObject(line));
                }
            }
            reader.close();
            return out;
        } finally {
            conn.disconnect();
        }
    }

    /** Runs a request to completion and returns its result, or throws its error. */
    public JSONObject call(String op, JSONObject params) throws IOException, JSONException, BridgeException {
        final JSONObject[] result = new JSONObject[1];
        final BridgeException[] failure = new BridgeException[1];
        stream(request(newId(), op, params), new Listener() {
            public void onEvent(JSONObject event) {}

            public void onResult(JSONObject r) {
                result[0] = r;
            }

            public void onError(String code, String message, JSONObject error) {
                failure[0] = new BridgeException(code, message, error == null ? 0 : error.optDouble("retry_after", 0));
            }

            public void onDone(JSONObject done) {}
        });
        if (failure[0] != null) {
            throw failure[0];
        }
        return result[0];
    }

    /** Asks the runtime to cancel request {@code targetId}; true if it was running. */
    public boolean cancel(String targetId) throws IOException, JSONException, BridgeException {
        JSONObject params = new JSONObject();
        params.put("target", targetId);
        JSONObject r = call("cancel", params);
        return r != null && r.optBoolean("found");
    }

    /** GET a path (e.g. /v1/models); returns the HTTP status and fills body[0]. */
    public int get(String path, String[] body) throws IOException {
        HttpURLConnection conn = connection(path);
        try {
            int status = pinned(conn).getResponseCode();
            InputStream in = status >= 400 ? conn.getErrorStream() : conn.getInputStream();
            if (body != null) {
                body[0] = in == null ? "" : new String(readAll(in), "UTF-8");
            }
            return status;
        } finally {
            conn.disconnect();
        }
    }

    /** A connection to path with the timeouts, the token and (LAN) the pin set on it. */
    private HttpURLConnection connection(String path) throws IOException {
        HttpURLConnection conn = (HttpURLConnection) new URL(baseUrl + path).openConnection();
        if (tls != null) {
            if (!(conn instanceof HttpsURLConnection)) {
                throw new IOException(baseUrl + " is not https: a clinic server is reached over TLS only");
            }
            tls.apply((HttpsURLConnection) conn);
        }
        conn.setConnectTimeout(connectTimeoutMs);
        conn.setReadTimeout(readTimeoutMs);
        if (token != null) {
            conn.setRequestProperty("Authorization", "Bearer " + token);
        }
        return conn;
    }

    private HttpURLConnection open(String path, String body, String accept) throws IOException {
        byte[] data = body.getBytes("UTF-8");
        HttpURLConnection conn = connection(path);
        conn.setRequestMethod("POST");
        conn.setDoOutput(true);
        conn.setFixedLengthStreamingMode(data.length);
        conn.setRequestProperty("Content-Type", "application/json");
        conn.setRequestProperty("Accept", accept);
        OutputStream out = pinned(conn).getOutputStream();
        try {
            out.write(data);
        } finally {
            out.close();
        }
        return conn;
    }

    /**
     * Connects conn; a handshake refused by the pin becomes an {@link SSLPeerUnverifiedException}
     * whose message names both fingerprints (the JVM's own wording varies between versions).
     */
    private HttpURLConnection pinned(HttpURLConnection conn) throws IOException {
        try {
            conn.connect();
        } catch (SSLException e) {
            for (Throwable t = e; t != null; t = t.getCause()) {
                if (t instanceof CertificateException) {
                    SSLPeerUnverifiedException refused = new SSLPeerUnverifiedException(t.getMessage());
                    refused.initCause(e);
                    conn.disconnect();
                    throw refused;
                }
            }
            throw e;
        }
        return conn;
    }

    /**
     * The error code of an HTTP status whose body did not come: the JVM drops the body of a 401
     * to a POST sent in streaming mode (as every request here is).
     */
    static String statusCode(int status) {
        return status == 401 ? "unauthorized" : "http_" + status;
    }

    static String statusMessage(int status) {
        return status == 401
            ? "the server refused this client's token (HTTP 401): a wrong or revoked token; pair this device again"
            : "HTTP " + status + " with no body";
    }

    private static String checkHttps(String url) {
        URL parsed;
        try {
            parsed = new URL(url);
        } catch (MalformedURLException e) {
            throw new IllegalArgumentException("a clinic server's URL is https://HOST:PORT: " + e.getMessage());
        }
        if (!"https".equals(parsed.getProtocol()) || parsed.getHost().isEmpty()) {
            throw new IllegalArgumentException("a clinic server's URL is https://HOST:PORT, not " + url);
        }
        return url;
    }

    /** Like {@link #readAll}, refusing a body over {@code limit} bytes. */
    static byte[] readAtMost(InputStream in, int limit) throws IOException {
        ByteArrayOutputStream buf = new ByteArrayOutputStream();
        byte[] chunk = new byte[8192];
        int n;
        while ((n = in.read(chunk)) > 0) {
            if (buf.size() + n > limit) {
                throw new IOException("the server's reply is over " + limit + " bytes: not a bridge server?");
            }
            buf.write(chunk, 0, n);
        }
        return buf.toByteArray();
    }

    static byte[] readAll(InputStream in) throws IOException {
        ByteArrayOutputStream buf = new ByteArrayOutputStream();
        byte[] chunk = new byte[8192];
        int n;
        while ((n = in.read(chunk)) > 0) {
            buf.write(chunk, 0, n);
        }
        return buf.toByteArray();
    }
}
