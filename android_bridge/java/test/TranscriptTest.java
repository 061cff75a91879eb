import java.io.File;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.concurrent.atomic.AtomicInteger;

import org.json.JSONException;
import org.json.JSONObject;
import org.medgemma.edge.bridge.BridgeClient;
import org.medgemma.edge.bridge.Transcript;

/**
 * Replays the golden transcripts against a running server, then checks streaming callbacks,
 * cancel and a wrong token. Usage: TranscriptTest ENDPOINT_FILE FIXTURES_DIR [transcript ...].
 * Prints one line per check; exits 1 on the first failure.
 */
public final class TranscriptTest {
    public static void main(String[] args) throws Exception {
        File endpoint = new File(args[0]);
        BridgeClient client = BridgeClient.fromEndpointFile(endpoint);
        File dir = new File(args[1]);
        List<String> names = new ArrayList<String>(Arrays.asList(args).subList(2, args.length));
        int steps = 0;
        for (String name : names) {
            for (Transcript.Step step : Transcript.read(new File(dir, name))) {
                int[] status = new int[1];
                List<JSONObject> replies = client.replies(step.body, status);
                String problem = Transcript.check(step.expect, replies);
                if (problem == null && step.status >= 0 && step.status != status[0]) {
                    problem = "HTTP status " + status[0] + ", expected " + step.status;
                }
                if (problem != null) {
                    fail(name + ": " + problem);
                }
                steps++;
            }
            System.out.println("ok transcript " + name);
        }
        checkStreamingAndCancel(client);
        checkWrongToken(endpoint);
        System.out.println("ok java " + steps + " steps");
    }

    private static void checkStreamingAndCancel(final BridgeClient client) throws Exception {
        final String id = BridgeClient.newId();
        JSONObject params = new JSONObject();
        params.put("prompt", "Describe the chest radiograph findings of pneumonia in detail.");
        params.put("max_tokens", 400);
        final AtomicInteger tokens = new AtomicInteger();
        final String[] finish = new String[1];
        final boolean[] found = new boolean[1];
        client.stream(BridgeClient.request(id, "generate", params), new BridgeClient.Listener() {
            public void onEvent(JSONObject event) throws JSONException {
                if ("token".equals(event.getString("event")) && tokens.incrementAndGet() == 2) {
                    try {
                        found[0] = client.cancel(id); // from the callback, on another connection
                    } catch (Exception e) {
                        throw new RuntimeException(e);
                    }
                }
            }

            public void onResult(JSONObject result) {
                fail("a cancelled generation must not send a result");
            }

            public void onError(String code, String message, JSONObject error) {
                fail("unexpected error " + code + ": " + message);
            }

            public void onDone(JSONObject done) throws JSONException {
                finish[0] = done.getString("finish_reason");
            }
        });
        if (!found[0] || !"cancelled".equals(finish[0]) || tokens.get() >= 400) {
            fail("cancel: found=" + found[0] + " finish=" + finish[0] + " tokens=" + tokens.get());
        }
        System.out.println("ok streaming callbacks and cancel after " + tokens.get() + " tokens");
    }

    private static void checkWrongToken(File endpoint) throws Exception {
        JSONObject ep = new JSONObject(new String(java.nio.file.Files.readAllBytes(endpoint.toPath()), "UTF-8"));
        BridgeClient bad = new BridgeClient(ep.getString("url"), "0000000000000000000000000000000000000000");
        String[] body = new String[1];
        int status = bad.get("/v1/models", body);
        if (status != 401) {
            fail("wrong token gave HTTP " + status);
        }
        System.out.println("ok wrong token -> 401");
    }

    static void fail(String message) {
        System.out.println("FAIL " + message);
        System.exit(1);
    }
}
