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
import java.net.URL;
import java.util.ArrayList;
import java.util.List;
import java.util.UUID;

import org.json.JSONException;
import org.json.JSONObject;

/**
 * Client for the medgemma-edge bridge (protocol v1) over loopback HTTP.
 *
 * <p>Java 8 level, {@link HttpURLConnection} and org.json only, so the same source builds for
 * Android and for a desktop JVM. Each request is one {@code POST /v1/rpc}; its replies arrive as
 * JSON lines and are handed to a {@link Listener} as they come: events, then a result or an
 * error, then exactly one {@code done}. {@link #stream} blocks the calling thread: call it from a
 * worker thread, never from Android's main thread. {@link #cancel} (from any thread) ends the
 * target stream with {@code done} whose finish_reason is {@code cancelled}.
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

    private final String baseUrl;
    private final String token;
    private int connectTimeoutMs = 10000;
    private int readTimeoutMs = 0; // generation can take minutes; 0 = no timeout

    public BridgeClient(String baseUrl, String token) {
        this.baseUrl = baseUrl.endsWith("/") ? baseUrl.substring(0, baseUrl.length() - 1) : baseUrl;
        this.token = token;
    }

    /** Reads the endpoint file that {@code medgemma-edge serve} writes (url and token). */
    public static BridgeClient fromEndpointFile(File file) throws IOException, JSONException {
        InputStream in = new FileInputStream(file);
        try {
            JSONObject ep = new JSONObject(new String(readAll(in), "UTF-8"));
            return new BridgeClient(ep.getString("url"), ep.getString("token"));
        } finally {
            in.close();
        }
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
        HttpURLConnection conn = open("/v1/rpc", body);
        try {
            int status = conn.getResponseCode();
            InputStream in = status >= 400 ? conn.getErrorStream() : conn.getInputStream();
            if (in == null) {
                throw new IOException("HTTP " + status + " with no body");
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
        HttpURLConnection conn = open("/v1/rpc", body);
        try {
            int status = conn.getResponseCode();
            if (statusOut != null) {
                statusOut[0] = status;
            }
            InputStream in = status >= 400 ? conn.getErrorStream() : conn.getInputStream();
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
        HttpURLConnection conn = (HttpURLConnection) new URL(baseUrl + path).openConnection();
        try {
            conn.setConnectTimeout(connectTimeoutMs);
            conn.setReadTimeout(readTimeoutMs);
            conn.setRequestProperty("Authorization", "Bearer " + token);
            int status = conn.getResponseCode();
            InputStream in = status >= 400 ? conn.getErrorStream() : conn.getInputStream();
            if (body != null) {
                body[0] = in == null ? "" : new String(readAll(in), "UTF-8");
            }
            return status;
        } finally {
            conn.disconnect();
        }
    }

    private HttpURLConnection open(String path, String body) throws IOException {
        byte[] data = body.getBytes("UTF-8");
        HttpURLConnection conn = (HttpURLConnection) new URL(baseUrl + path).openConnection();
        conn.setConnectTimeout(connectTimeoutMs);
        conn.setReadTimeout(readTimeoutMs);
        conn.setRequestMethod("POST");
        conn.setDoOutput(true);
        conn.setFixedLengthStreamingMode(data.length);
        conn.setRequestProperty("Content-Type", "application/json");
        conn.setRequestProperty("Accept", "application/x-ndjson");
        conn.setRequestProperty("Authorization", "Bearer " + token);
        OutputStream out = conn.getOutputStream();
        try {
            out.write(data);
        } finally {
            out.close();
        }
        return conn;
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
