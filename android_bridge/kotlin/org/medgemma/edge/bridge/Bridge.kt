package org.medgemma.edge.bridge

import java.io.File
import org.json.JSONObject

/** An error reply: a protocol error code, its message, and seconds to wait (loading, busy). */
data class BridgeError(val code: String, val message: String, val retryAfter: Double?)

/** How a request ended: the `done` reply, with the result or error that came before it. */
data class Outcome(
    val finishReason: String,
    val usage: JSONObject,
    val timings: JSONObject,
    val result: JSONObject?,
    val error: BridgeError?
)

/**
 * Kotlin face of [BridgeClient]: lambdas for the streaming callbacks, [Outcome] for the end.
 *
 * Kotlin 1.3 level and no coroutines library, so it builds with the same toolchain as the Java
 * client; call these from a worker thread (or wrap them in `withContext(Dispatchers.IO)` in an
 * app that has coroutines). [cancel] may be called from any thread, e.g. from inside onToken.
 *
 * A clinic server (`serve --lan`): [pair] once with the admin's pairing code, keep the pairing
 * (its token is secret), then [lan] for every session. There a generation that finds
 * MedGemma busy waits its turn and gets [BridgeClient.Queued] events (`onQueued`) first.
 */
class Bridge(val client: BridgeClient) {
    companion object {
        fun fromEndpointFile(file: File): Bridge = Bridge(BridgeClient.fromEndpointFile(file))

        /** A clinic server at [url] (https), TLS pinned to [fingerprint], as the paired device [token]. */
        fun lan(url: String, fingerprint: String, token: String): Bridge = Bridge(BridgeClient.lan(url, fingerprint, token))

        /** A clinic server as the device of [pairing] (what [pair] returned and the app stored). */
        fun lan(pairing: BridgeClient.Pairing): Bridge = Bridge(pairing.client())

        /** Pairs this device ([BridgeClient.pair]); a refused code throws BridgeException "unauthorized",
         *  a server whose certificate is not [fingerprint] SSLPeerUnverifiedException (nothing sent).
         *  Keep what it returns ([BridgeClient.Pairing.toJson]) in the app's private storage. */
        fun pair(url: String, fingerprint: String, code: String, deviceName: String): BridgeClient.Pairing =
            BridgeClient.pair(url, fingerprint, code, deviceName)

        fun newId(): String = "kt-" + java.util.UUID.randomUUID().toString()
    }

    /** Sends op with params and streams the replies; returns when `done` arrives. */
    fun stream(
        op: String,
        params: JSONObject = JSONObject(),
        id: String = newId(),
        onEvent: (JSONObject) -> Unit = {},
        onQueued: (BridgeClient.Queued) -> Unit = {},
        onToken: (String) -> Unit = {}
    ): Outcome {
        var result: JSONObject? = null
        var error: BridgeError? = null
        var done: JSONObject? = null
        client.stream(BridgeClient.request(id, op, params), object : BridgeClient.Listener {
            override fun onEvent(event: JSONObject) {
                if (event.getString("event") == "token") onToken(event.getString("text"))
                BridgeClient.Queued.of(event)?.let(onQueued)
                onEvent(event)
            }

            override fun onResult(result_: JSONObject) {
                result = result_
            }

            override fun onError(code: String, message: String, error_: JSONObject?) {
                val retry = if (error_ != null && error_.has("retry_after")) error_.getDouble("retry_after") else null
                error = BridgeError(code, message, retry)
            }

            override fun onDone(done_: JSONObject) {
                done = done_
            }
        })
        val d = done ?: JSONObject().put("finish_reason", "error").put("usage", JSONObject()).put("timings", JSONObject())
        return Outcome(d.getString("finish_reason"), d.getJSONObject("usage"), d.getJSONObject("timings"), result, error)
    }

    /** A question (with optional images as file bytes), tokens to [onToken] as they come. */
    fun generate(
        prompt: String,
        maxTokens: Int? = null,
        images: List<ByteArray> = emptyList(),
        id: String = newId(),
        onQueued: (BridgeClient.Queued) -> Unit = {},
        onToken: (String) -> Unit = {}
    ): Outcome {
        val params = JSONObject().put("prompt", prompt)
        if (maxTokens != null) params.put("max_tokens", maxTokens)
        if (images.isNotEmpty()) {
            val arr = org.json.JSONArray()
            for (bytes in images) arr.put(JSONObject().put("base64", Base64Codec.encode(bytes)))
            params.put("images", arr)
        }
        return stream("generate", params, id, onQueued = onQueued, onToken = onToken)
    }

    fun health(): JSONObject = client.call("health", JSONObject())

    // -- received studies (the runtime's DICOM node) --------------------------------------------

    /** Received studies, newest first: `{"studies": [...], "total", "offset", "limit"}`. */
    fun listStudies(offset: Int = 0, limit: Int = 50, modality: String? = null): JSONObject {
        val params = JSONObject().put("offset", offset).put("limit", limit)
        if (modality != null) params.put("modality", modality)
        return client.call("list_studies", params)
    }

    /** One study with its series and instances (and which of them this device can display). */
    fun getStudy(studyUid: String): JSONObject = client.call("get_study", JSONObject().put("study", studyUid))

    /** An image source naming a received instance, for [generateAbout], classify, search_similar. */
    fun studySource(studyUid: String, instanceUid: String? = null, frame: Int? = null): JSONObject {
        val src = JSONObject().put("study", studyUid)
        if (instanceUid != null) src.put("instance", instanceUid)
        if (frame != null) src.put("frame", frame)
        return src
    }

    /** A question about image sources (e.g. [studySource]), tokens to [onToken] as they come. */
    fun generateAbout(
        prompt: String,
        sources: List<JSONObject>,
        maxTokens: Int? = null,
        id: String = newId(),
        onQueued: (BridgeClient.Queued) -> Unit = {},
        onToken: (String) -> Unit = {}
    ): Outcome {
        val params = JSONObject().put("prompt", prompt).put("images", org.json.JSONArray(sources))
        if (maxTokens != null) params.put("max_tokens", maxTokens)
        return stream("generate", params, id, onQueued = onQueued, onToken = onToken)
    }

    // -- reports: draft, sign, amend, export, deliver -------------------------------------------

    /** Saves a draft: a new report (no [reportId]) or an update of a draft. Returns the REPORT. */
    fun saveReport(final: JSONObject, source: JSONObject, draft: JSONObject? = null, reportId: String? = null): JSONObject {
        val params = JSONObject().put("final", final).put("source", source)
        if (draft != null) params.put("draft", draft)
        if (reportId != null) params.put("report_id", reportId)
        return client.call("save_report", params)
    }

    /** Signs [version]; it can never change afterwards (a second sign is a "conflict" error). */
    fun signReport(reportId: String, version: Int, signer: String, role: String): JSONObject =
        client.call(
            "sign_report",
            JSONObject().put("report_id", reportId).put("version", version).put("signer", signer).put("role", role)
        )

    /** A new draft version replacing the signed one; both are kept. */
    fun amendReport(reportId: String, final: JSONObject, reason: String): JSONObject =
        client.call("amend_report", JSONObject().put("report_id", reportId).put("final", final).put("reason", reason))

    /** A signed version as "sr" (DICOM), "fhir" (JSON) or "pdf": the file's bytes. */
    fun exportReport(reportId: String, format: String, version: Int? = null): ByteArray {
        val params = JSONObject().put("report_id", reportId).put("format", format)
        if (version != null) params.put("version", version)
        return Base64Codec.decode(client.call("export_report", params).getString("base64"))
    }

    /** Queues a signed version for delivery (default: the runtime's configured destination). */
    fun sendReport(reportId: String, destination: JSONObject? = null): JSONObject {
        val params = JSONObject().put("report_id", reportId)
        if (destination != null) params.put("destination", destination)
        return client.call("send_report", params)
    }

    /** Every outbox item with its delivery state. */
    fun outbox(): org.json.JSONArray = client.call("outbox", JSONObject()).getJSONArray("items")

    /** Cancels request [id]; its stream ends with finish_reason "cancelled". */
    fun cancel(id: String): Boolean = client.cancel(id)

    /** Every reply line of a raw request body, and the HTTP status (transcript tests). */
    fun replies(body: String): Pair<Int, List<JSONObject>> {
        val status = IntArray(1)
        val lines = client.replies(body, status)
        return Pair(status[0], lines)
    }
}

/** Base64 without android.util.Base64 or java.util.Base64 (API 26+), so it runs everywhere. */
object Base64Codec {
    private const val ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    fun encode(data: ByteArray): String {
        val sb = StringBuilder((data.size + 2) / 3 * 4)
        var i = 0
        while (i < data.size) {
            val b0 = data[i].toInt() and 0xff
            val b1 = if (i + 1 < data.size) data[i + 1].toInt() and 0xff else 0
            val b2 = if (i + 2 < data.size) data[i + 2].toInt() and 0xff else 0
            sb.append(ALPHABET[b0 shr 2])
            sb.append(ALPHABET[((b0 and 3) shl 4) or (b1 shr 4)])
            sb.append(if (i + 1 < data.size) ALPHABET[((b1 and 15) shl 2) or (b2 shr 6)] else '=')
            sb.append(if (i + 2 < data.size) ALPHABET[b2 and 63] else '=')
            i += 3
        }
        return sb.toString()
    }

    fun decode(text: String): ByteArray {
        val clean = text.filter { it != '\n' && it != '\r' }
        require(clean.length % 4 == 0) { "base64 length must be a multiple of 4" }
        val out = java.io.ByteArrayOutputStream(clean.length / 4 * 3)
        var i = 0
        while (i < clean.length) {
            val c = IntArray(4) { k -> if (clean[i + k] == '=') 0 else ALPHABET.indexOf(clean[i + k]).also { require(it >= 0) { "not base64" } } }
            val n = (c[0] shl 18) or (c[1] shl 12) or (c[2] shl 6) or c[3]
            out.write((n shr 16) and 0xff)
            if (clean[i + 2] != '=') out.write((n shr 8) and 0xff)
            if (clean[i + 3] != '=') out.write(n and 0xff)
            i += 4
        }
        return out.toByteArray()
    }
}
