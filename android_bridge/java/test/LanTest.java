import java.io.File;
import java.net.URL;
import java.util.ArrayList;
import java.util.List;
import java.util.Locale;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

import javax.net.ssl.HttpsURLConnection;
import javax.net.ssl.SSLPeerUnverifiedException;

import org.json.JSONException;
import org.json.JSONObject;
import org.medgemma.edge.bridge.BridgeClient;

/**
 * The Java client against a clinic server (serve --lan). Usage: LanTest ENDPOINT_FILE MODE [ARGS].
 *
 * <p>basic: pairing (the pin given in upper case with ':' separators; the pairing stored and
 * read back), a replayed code, malformed pins, health and a generation over pinned TLS, a wrong
 * pin (and a code sent with a wrong pin never reaches the server), a wrong token, a device
 * asking for an admin op, then the device revoked by the admin: its token gets HTTP 401.
 *
 * <p>queue SIGNAL: two generations that find MedGemma taken (the test holds its turn) get queued
 * events (position 1 for the first; 2 then 1 for the second), then their answers, in order; once
 * both are queued it creates the file SIGNAL, the test's cue to let MedGemma go.
 *
 * <p>cancel: a generation waiting its turn (the test holds it) is cancelled: another device's
 * cancel of the same id finds nothing, the owner's ends it with done(cancelled).
 *
 * <p>trusted TRUSTSTORE URL: with the server's certificate trusted by this JVM (a plain
 * HttpsURLConnection accepts it), a client pinned to another fingerprint still refuses it; at
 * URL, the server at an address its certificate does not name, the JVM's host name check
 * refuses it and a pinned client gets in.
 *
 * <p>Prints one line per check; exits 1 on the first failure.
 */
public final class LanTest {
    private static String url;
    private static String fingerprint;

    public static void main(String[] args) throws Exception {
        if ("trusted".equals(args[1])) { // before anything makes the JVM's default SSLContext
            System.setProperty("javax.net.ssl.trustStore", args[2]);
            System.setProperty("javax.net.ssl.trustStorePassword", "changeit");
            System.setProperty("javax.net.ssl.trustStoreType", "PKCS12");
        }
        File endpoint = new File(args[0]);
        JSONObject ep = new JSONObject(new String(java.nio.file.Files.readAllBytes(endpoint.toPath()), "UTF-8"));
        url = ep.getString("url");
        fingerprint = ep.getString("fingerprint");
        BridgeClient admin = BridgeClient.fromEndpointFile(endpoint);
        if (!fingerprint.equals(admin.fingerprint())) {
            fail("fromEndpointFile did not pin the endpoint's fingerprint: " + admin.fingerprint());
        }
        if ("queue".equals(args[1])) {
            checkQueue(admin, args[2]);
        } else if ("cancel".equals(args[1])) {
            checkCancel(admin);
        } else if ("trusted".equals(args[1])) {
            checkTrusted(ep.getString("token"), args[3]);
        } else {
            checkBasic(admin);
        }
    }

    private static String pairCode(BridgeClient admin) throws Exception {
        return admin.call("lan_pair_code", new JSONObject()).getString("code");
    }

    /** The fingerprint as a person may type it: upper case, a ':' between bytes. */
    private static String withColons(String hex) {
        StringBuilder sb = new StringBuilder();
        for (int i = 0; i < hex.length(); i += 2) {
            sb.append(i == 0 ? "" : ":").append(hex.substring(i, i + 2).toUpperCase(Locale.ROOT));
        }
        return sb.toString();
    }

    private static void checkBasic(BridgeClient admin) throws Exception {
        String code = pairCode(admin);
        BridgeClient.Pairing paired = BridgeClient.pair(url, withColons(fingerprint), code, "java-tablet");
        if (!paired.token.matches("[0-9a-f]{64}") || !paired.deviceId.startsWith("dev-")
            || !fingerprint.equals(paired.fingerprint)) {
            fail("pairing reply: device " + paired.deviceId + " fingerprint " + paired.fingerprint);
        }
        BridgeClient.Pairing stored = BridgeClient.Pairing.fromJson(new JSONObject(paired.toJson().toString()));
        if (!stored.token.equals(paired.token) || !stored.url.equals(url) || !stored.deviceId.equals(paired.deviceId)) {
            fail("the stored pairing did not read back: " + stored.url + " " + stored.deviceId);
        }
        System.out.println("ok pair " + paired.deviceId);

        expectError("a replayed code", "unauthorized", new Call() {
            public void run() throws Exception {
                BridgeClient.pair(url, fingerprint, code, "java-tablet-again");
            }
        });

        final String fresh = pairCode(admin);
        expectError("a blank device name", "invalid_request", new Call() {
            public void run() throws Exception {
                BridgeClient.pair(url, fingerprint, fresh, "   ");
            }
        });

        for (final String pin : new String[] {"abc", fingerprint.substring(1) + "g", fingerprint + "00", null}) {
            try {
                BridgeClient.lan(url, pin, paired.token);
                fail("a malformed pin was accepted: " + pin);
            } catch (IllegalArgumentException e) {
                if (!e.getMessage().contains("64 hex characters") && pin != null) {
                    fail("unclear malformed-pin message: " + e.getMessage());
                }
            }
        }
        try {
            BridgeClient.lan(url.replace("https://", "http://"), fingerprint, paired.token);
            fail("an http URL was accepted for a LAN client");
        } catch (IllegalArgumentException e) {
            System.out.println("ok malformed pins and an http URL refused at construction");
        }

        BridgeClient device = stored.client();
        JSONObject health = device.call("health", new JSONObject());
        String seen = health.getJSONObject("lan").getString("fingerprint");
        String concurrency = health.getJSONObject("capabilities").getString("concurrency");
        if (!fingerprint.equals(seen) || !"queue".equals(concurrency)) {
            fail("health over LAN: fingerprint " + seen + " concurrency " + concurrency);
        }
        System.out.println("ok health over pinned TLS");
        checkGenerate(device);

        final String wrong = (fingerprint.charAt(0) == '0' ? "1" : "0") + fingerprint.substring(1);
        try {
            BridgeClient.lan(url, wrong, paired.token).call("health", new JSONObject());
            fail("a wrong pin was accepted");
        } catch (SSLPeerUnverifiedException e) {
            if (!e.getMessage().contains(fingerprint) || !e.getMessage().contains(wrong)) {
                fail("the wrong-pin message does not name both fingerprints: " + e.getMessage());
            }
            System.out.println("ok wrong pin refused: " + e.getMessage());
        }
        final String unsent = pairCode(admin);
        BridgeClient.Pairing second = null;
        try {
            BridgeClient.pair(url, wrong, unsent, "java-tablet-wrong-pin");
            fail("pairing with a wrong pin was accepted");
        } catch (SSLPeerUnverifiedException e) {
            // the code never left this process: it still pairs with the right pin
            second = BridgeClient.pair(url, fingerprint, unsent, "java-tablet-2");
            System.out.println("ok pairing with a wrong pin sends nothing (the code then paired " + second.deviceId + ")");
        }

        String wrongToken = refusal(BridgeClient.lan(url, fingerprint, "00000000000000000000000000000000000000000000000000000000000000ff"));
        if (!"401 unauthorized".equals(wrongToken)) {
            fail("a wrong device token: " + wrongToken);
        }
        System.out.println("ok a wrong device token -> " + wrongToken);
        expectError("an admin op from a device", "forbidden", new Call() {
            public void run() throws Exception {
                BridgeClient.lan(url, fingerprint, paired.token).call("lan_pair_code", new JSONObject());
            }
        });

        JSONObject revoke = new JSONObject();
        revoke.put("device_id", paired.deviceId);
        if (!admin.call("lan_revoke", revoke).getBoolean("revoked")) {
            fail("lan_revoke did not find " + paired.deviceId);
        }
        String revoked = refusal(device);
        if (!"401 unauthorized".equals(revoked)) {
            fail("a revoked token: " + revoked);
        }
        System.out.println("ok revoked " + paired.deviceId + ": its token -> " + revoked);
        if (!second.client().call("health", new JSONObject()).has("lan")) {
            fail("revoking one device touched another");
        }
        System.out.println("ok java lan basic");
    }

    /** "STATUS CODE" of a health request that the server refuses (fails when it answers). */
    private static String refusal(BridgeClient client) throws Exception {
        final String[] code = new String[1];
        int status = client.stream(BridgeClient.request(BridgeClient.newId(), "health", new JSONObject()), new BridgeClient.Listener() {
            public void onEvent(JSONObject event) {}

            public void onResult(JSONObject result) {
                fail("a refused client got a result: " + result);
            }

            public void onError(String c, String message, JSONObject error) {
                code[0] = c;
            }

            public void onDone(JSONObject done) {}
        });
        return status + " " + code[0];
    }

    private static void checkGenerate(BridgeClient device) throws Exception {
        JSONObject params = new JSONObject();
        params.put("prompt", "Name one sign of pneumonia on a chest radiograph.");
        params.put("max_tokens", 6);
        final StringBuilder text = new StringBuilder();
        final JSONObject[] end = new JSONObject[2];
        device.stream(BridgeClient.request(BridgeClient.newId(), "generate", params), new BridgeClient.Listener() {
            public void onEvent(JSONObject event) throws JSONException {
                if (BridgeClient.Queued.of(event) != null) {
                    fail("a generation on an idle server was queued");
                }
                if ("token".equals(event.getString("event"))) {
                    text.append(event.getString("text"));
                }
            }

            public void onResult(JSONObject result) {
                end[0] = result;
            }

            public void onError(String code, String message, JSONObject error) {
                fail("generate over LAN: " + code + ": " + message);
            }

            public void onDone(JSONObject done) {
                end[1] = done;
            }
        });
        if (end[0] == null || end[1] == null || text.length() == 0 || !end[0].getString("text").equals(text.toString())) {
            fail("generate over LAN: tokens '" + text + "' result " + end[0] + " done " + end[1]);
        }
        System.out.println("ok generate over pinned TLS: " + end[1].getJSONObject("usage"));
    }

    /** One generation's replies, in order, with when its first token arrived. */
    private static final class Run implements BridgeClient.Listener {
        final List<BridgeClient.Queued> queued = new ArrayList<BridgeClient.Queued>();
        final CountDownLatch firstQueued = new CountDownLatch(1);
        int tokens;
        long firstTokenNs;
        JSONObject result;
        String finish;
        String error;
        boolean tokenBeforeQueued;

        public void onEvent(JSONObject event) throws JSONException {
            BridgeClient.Queued q = BridgeClient.Queued.of(event);
            if (q != null) {
                tokenBeforeQueued |= tokens > 0;
                queued.add(q);
                firstQueued.countDown();
            } else if ("token".equals(event.getString("event")) && tokens++ == 0) {
                firstTokenNs = System.nanoTime();
            }
        }

        public void onResult(JSONObject r) {
            result = r;
        }

        public void onError(String code, String message, JSONObject err) {
            error = code + ": " + message;
        }

        public void onDone(JSONObject done) throws JSONException {
            finish = done.getString("finish_reason");
        }

        String describe() {
            StringBuilder sb = new StringBuilder("positions");
            for (BridgeClient.Queued q : queued) {
                sb.append(' ').append(q.position).append(" (~").append(q.estimatedWaitS).append(" s)");
            }
            return sb + ", " + tokens + " tokens, finish " + finish + (error == null ? "" : ", error " + error);
        }
    }

    private static Thread start(final BridgeClient device, final Run run, final String id) {
        Thread t = new Thread(new Runnable() {
            public void run() {
                try {
                    JSONObject params = new JSONObject();
                    params.put("prompt", "Name one sign of pneumonia on a chest radiograph.");
                    params.put("max_tokens", 4);
                    device.stream(BridgeClient.request(id, "generate", params), run);
                } catch (Exception e) {
                    run.error = e.toString();
                }
            }
        });
        t.start();
        return t;
    }

    /** Tells the test (which holds MedGemma's turn) that the generations it waits for are queued. */
    private static void signal(String path) throws Exception {
        if (!new File(path).createNewFile()) {
            fail("the signal file " + path + " was there already");
        }
    }

    private static void checkQueue(BridgeClient admin, String signal) throws Exception {
        BridgeClient device = BridgeClient.pair(url, fingerprint, pairCode(admin), "java-queue").client();
        Run first = new Run();
        Run second = new Run();
        Thread a = start(device, first, BridgeClient.newId());
        if (!first.firstQueued.await(120, TimeUnit.SECONDS)) {
            fail("the first generation was never queued: " + first.describe());
        }
        Thread b = start(device, second, BridgeClient.newId());
        if (!second.firstQueued.await(120, TimeUnit.SECONDS)) {
            fail("the second generation was never queued: " + second.describe());
        }
        signal(signal);
        a.join(300000);
        b.join(300000);
        boolean ok = first.queued.size() == 1 && first.queued.get(0).position == 1;
        ok &= second.queued.size() == 2 && second.queued.get(0).position == 2 && second.queued.get(1).position == 1;
        for (Run r : new Run[] {first, second}) {
            for (BridgeClient.Queued q : r.queued) {
                ok &= q.estimatedWaitS >= 0;
            }
            ok &= r.result != null && r.tokens > 0 && r.error == null && !r.tokenBeforeQueued;
            ok &= "stop".equals(r.finish) || "length".equals(r.finish);
        }
        // the second starts after the first (its position 1 came when the first took its turn);
        // that the first ended before the second began is the server's queue's own test
        if (!ok || second.firstTokenNs < first.firstTokenNs) {
            fail("queue: first " + first.describe() + "; second " + second.describe()
                + "; second's first token after first's: " + (second.firstTokenNs >= first.firstTokenNs));
        }
        System.out.println("ok queued: first " + first.describe() + "; second " + second.describe());
    }

    /** A queued generation cancelled: by another device (finds nothing), then by its own. */
    private static void checkCancel(BridgeClient admin) throws Exception {
        BridgeClient owner = BridgeClient.pair(url, fingerprint, pairCode(admin), "java-cancel").client();
        BridgeClient other = BridgeClient.pair(url, fingerprint, pairCode(admin), "java-other").client();
        Run run = new Run();
        String id = BridgeClient.newId();
        Thread t = start(owner, run, id);
        if (!run.firstQueued.await(120, TimeUnit.SECONDS)) {
            fail("the generation was never queued: " + run.describe());
        }
        if (other.cancel(id)) {
            fail("another device's cancel reached this device's request");
        }
        if (!owner.cancel(id)) {
            fail("the owner's cancel did not find its queued request");
        }
        t.join(60000);
        if (t.isAlive() || !"cancelled".equals(run.finish) || run.result != null || run.tokens != 0 || run.error != null
            || run.queued.size() != 1 || run.queued.get(0).position != 1) {
            fail("cancel while queued: " + run.describe() + ", result " + run.result);
        }
        System.out.println("ok cancelled while queued: " + run.describe());
    }

    /**
     * This JVM trusts the server's certificate (the trust store holds it): a plain
     * HttpsURLConnection, with the JVM's own certificate and host name checks, gets in; a client
     * pinned to another fingerprint still refuses the certificate, and one pinned to it gets in.
     */
    private static void checkTrusted(String adminToken, String elsewhere) throws Exception {
        HttpsURLConnection plain = (HttpsURLConnection) new URL(url + "/v1/models").openConnection();
        plain.setRequestProperty("Authorization", "Bearer " + adminToken);
        int status = plain.getResponseCode();
        plain.disconnect();
        if (status != 200) {
            fail("a plain HttpsURLConnection with the certificate trusted: HTTP " + status);
        }
        System.out.println("ok the JVM's own checks accept the certificate (HTTP " + status + ")");
        String wrong = (fingerprint.charAt(0) == '0' ? "1" : "0") + fingerprint.substring(1);
        try {
            BridgeClient.lan(url, wrong, adminToken).get("/v1/models", null);
            fail("a certificate this JVM trusts was accepted against another pin");
        } catch (SSLPeerUnverifiedException e) {
            System.out.println("ok a trusted certificate refused against another pin");
        }
        int pinned = BridgeClient.lan(url, fingerprint, adminToken).get("/v1/models", null);
        if (pinned != 200) {
            fail("pinned to the certificate: HTTP " + pinned);
        }
        System.out.println("ok pinned to it: HTTP " + pinned);

        String host = new URL(elsewhere).getHost();
        HttpsURLConnection named = (HttpsURLConnection) new URL(elsewhere + "/v1/models").openConnection();
        named.setRequestProperty("Authorization", "Bearer " + adminToken);
        try {
            named.getResponseCode();
            fail("the JVM accepted the certificate at " + host + ", which it does not name");
        } catch (javax.net.ssl.SSLHandshakeException e) {
            System.out.println("ok at " + host + " the JVM's host name check refuses it: " + e.getMessage());
        } finally {
            named.disconnect();
        }
        JSONObject health = BridgeClient.lan(elsewhere, fingerprint, adminToken).call("health", new JSONObject());
        if (!fingerprint.equals(health.getJSONObject("lan").getString("fingerprint"))) {
            fail("health at " + host + ": " + health.getJSONObject("lan"));
        }
        System.out.println("ok at " + host + " the pin stands in for the host name: health over pinned TLS");
    }

    private interface Call {
        void run() throws Exception;
    }

    private static void expectError(String what, String code, Call call) throws Exception {
        try {
            call.run();
            fail(what + " was accepted");
        } catch (BridgeClient.BridgeException e) {
            if (!code.equals(e.code)) {
                fail(what + ": expected " + code + ", got " + e.code);
            }
            System.out.println("ok " + what + " -> " + e.code);
        }
    }

    static void fail(String message) {
        System.out.println("FAIL " + message);
        System.exit(1);
    }
}
