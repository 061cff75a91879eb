package org.medgemma.edge.bridge;

import java.io.BufferedReader;
import java.io.File;
import java.io.FileInputStream;
import java.io.IOException;
import java.io.InputStreamReader;
import java.util.ArrayList;
import java.util.Iterator;
import java.util.List;

import org.json.JSONArray;
import org.json.JSONException;
import org.json.JSONObject;

/**
 * The golden transcripts of android_bridge/fixtures/ (see PROTOCOL.md, "Golden transcripts"):
 * lines {"send": request} or {"send_raw": text} (optionally "status"), each followed by
 * {"expect": pattern} lines with an optional "repeat" of "*" (zero or more) or "+" (one or
 * more). Pattern strings "&lt;any&gt;", "&lt;string&gt;", "&lt;number&gt;", "&lt;int&gt;",
 * "&lt;bool&gt;", "&lt;object&gt;", "&lt;array&gt;", "&lt;null&gt;", "&lt;absent&gt;" and
 * "&lt;enum:a|b&gt;" stand for volatile values; objects match when every pattern key matches.
 * The same rules are implemented in android_bridge/transcripts.py.
 */
public final class Transcript {
    /** One request and the replies it must produce. */
    public static final class Step {
        public final String body;
        public final int status; // -1: not checked
        public final List<JSONObject> expect = new ArrayList<JSONObject>();

        Step(String body, int status) {
            this.body = body;
            this.status = status;
        }
    }

    private Transcript() {}

    public static List<Step> read(File file) throws IOException, JSONException {
        List<Step> steps = new ArrayList<Step>();
        BufferedReader r = new BufferedReader(new InputStreamReader(new FileInputStream(file), "UTF-8"));
        try {
            String line;
            while ((line = r.readLine()) != null) {
                if (line.trim().isEmpty()) {
                    continue;
                }
                JSONObject obj = new JSONObject(line);
                if (obj.has("send") || obj.has("send_raw")) {
                    String body = obj.has("send") ? obj.getJSONObject("send").toString() : obj.getString("send_raw");
                    steps.add(new Step(body, obj.optInt("status", -1)));
                } else if (obj.has("expect")) {
                    steps.get(steps.size() - 1).expect.add(obj);
                }
            }
        } finally {
            r.close();
        }
        return steps;
    }

    /** Null when the replies match the expectations, else what went wrong. */
    public static String check(List<JSONObject> expect, List<JSONObject> replies) throws JSONException {
        int i = 0;
        for (JSONObject e : expect) {
            Object pattern = e.get("expect");
            String repeat = e.optString("repeat", "");
            int n = 0;
            while (i < replies.size() && matches(pattern, replies.get(i))) {
                i++;
                n++;
                if (repeat.isEmpty()) {
                    break;
                }
            }
            if (n == 0 && !"*".equals(repeat)) {
                String got = i < replies.size() ? replies.get(i).toString() : "(no more replies)";
                return "expected " + pattern + " but got " + got;
            }
        }
        if (i != replies.size()) {
            return "unexpected extra reply " + replies.get(i);
        }
        return null;
    }

    public static boolean matches(Object pattern, Object actual) throws JSONException {
        if (pattern instanceof String && ((String) pattern).startsWith("<") && ((String) pattern).endsWith(">")) {
            String p = (String) pattern;
            if (p.equals("<any>")) return true;
            if (p.equals("<string>")) return actual instanceof String;
            if (p.equals("<number>")) return actual instanceof Number;
            if (p.equals("<int>")) return actual instanceof Integer || actual instanceof Long;
            if (p.equals("<bool>")) return actual instanceof Boolean;
            if (p.equals("<object>")) return actual instanceof JSONObject;
            if (p.equals("<array>")) return actual instanceof JSONArray;
            if (p.equals("<null>")) return actual == null || actual == JSONObject.NULL;
            if (p.startsWith("<enum:")) {
                for (String option : p.substring(6, p.length() - 1).split("\\|")) {
                    if (option.equals(String.valueOf(actual))) return true;
                }
                return false;
            }
            return p.equals(actual);
        }
        if (pattern instanceof JSONObject) {
            if (!(actual instanceof JSONObject)) return false;
            JSONObject p = (JSONObject) pattern;
            JSONObject a = (JSONObject) actual;
            Iterator<String> keys = p.keys();
            while (keys.hasNext()) {
                String k = keys.next();
                Object pv = p.get(k);
                if ("<absent>".equals(pv)) {
                    if (a.has(k)) return false;
                    continue;
                }
                if (!a.has(k) || !matches(pv, a.get(k))) return false;
            }
            return true;
        }
        if (pattern instanceof JSONArray) {
            if (!(actual instanceof JSONArray)) return false;
            JSONArray p = (JSONArray) pattern;
            JSONArray a = (JSONArray) actual;
            if (p.length() != a.length()) return false;
            for (int j = 0; j < p.length(); j++) {
                if (!matches(p.get(j), a.get(j))) return false;
            }
            return true;
        }
        if (pattern instanceof Number && actual instanceof Number) {
            return ((Number) pattern).doubleValue() == ((Number) actual).doubleValue();
        }
        if (pattern == JSONObject.NULL) return actual == null || actual == JSONObject.NULL;
        return pattern.equals(actual);
    }
}
