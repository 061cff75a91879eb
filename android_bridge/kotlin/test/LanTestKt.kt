import java.io.File
import javax.net.ssl.SSLPeerUnverifiedException
import kotlin.system.exitProcess
import org.json.JSONObject
import org.medgemma.edge.bridge.Bridge
import org.medgemma.edge.bridge.BridgeClient

/** The Kotlin wrapper against a clinic server (serve --lan): pair, health over pinned TLS, a wrong
 *  pin refused, then a generation that waits its turn (the test holds MedGemma until this creates
 *  SIGNAL_FILE on the first queued event) and gets typed queued events, then its answer.
 *  Usage: LanTestKt ENDPOINT_FILE SIGNAL_FILE */
fun main(args: Array<String>) {
    val endpoint = File(args[0])
    val signal = File(args[1])
    val ep = JSONObject(endpoint.readText())
    val url = ep.getString("url")
    val fingerprint = ep.getString("fingerprint")
    val code = Bridge.fromEndpointFile(endpoint).client.call("lan_pair_code", JSONObject()).getString("code")
    val paired = Bridge.pair(url, fingerprint.toUpperCase(), code, "kotlin-tablet")
    val bridge = Bridge.lan(BridgeClient.Pairing.fromJson(paired.toJson()))
    val lan = bridge.health().getJSONObject("lan")
    if (lan.getString("fingerprint") != fingerprint) lanFail("health: fingerprint ${lan.getString("fingerprint")}")
    val wrong = (if (fingerprint[0] == '0') "1" else "0") + fingerprint.substring(1)
    try {
        Bridge.lan(url, wrong, paired.token).health()
        lanFail("a wrong pin was accepted")
    } catch (e: SSLPeerUnverifiedException) {
        println("ok kotlin wrong pin refused")
    }
    val queued = mutableListOf<BridgeClient.Queued>()
    val text = StringBuilder()
    val out = bridge.generate("Name one sign of pneumonia.", maxTokens = 4, onQueued = {
        queued.add(it)
        if (queued.size == 1 && !signal.createNewFile()) lanFail("the signal file was there already")
    }) {
        if (queued.isEmpty()) lanFail("a token came before the queued event")
        text.append(it)
    }
    val answer = out.result?.getString("text")
    if (out.error != null || answer == null || answer != text.toString() || text.length == 0) {
        lanFail("generate: error ${out.error} result ${out.result} tokens '$text'")
    }
    if (queued.size != 1 || queued[0].position != 1 || queued[0].estimatedWaitS < 0) {
        lanFail("queued events: ${queued.map { it.position }}")
    }
    println("ok kotlin lan: paired ${paired.deviceId}; queued at ${queued.map { it.position }}; ${out.finishReason} ${out.usage}")
}

fun lanFail(message: String): Nothing {
    println("FAIL $message")
    exitProcess(1)
}
