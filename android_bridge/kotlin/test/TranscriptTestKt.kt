import java.io.File
import kotlin.system.exitProcess
import org.json.JSONObject
import org.medgemma.edge.bridge.Bridge
import org.medgemma.edge.bridge.BridgeClient
import org.medgemma.edge.bridge.Transcript

/** The golden transcripts and a cancelled stream, through the Kotlin wrapper.
 *  Usage: TranscriptTestKt ENDPOINT_FILE FIXTURES_DIR IMAGE_FILE [transcript ...] */
fun main(args: Array<String>) {
    val bridge = Bridge.fromEndpointFile(File(args[0]))
    val dir = File(args[1])
    var steps = 0
    for (name in args.drop(3)) {
        for (step in Transcript.read(File(dir, name))) {
            val (status, replies) = bridge.replies(step.body)
            var problem = Transcript.check(step.expect, replies)
            if (problem == null && step.status >= 0 && step.status != status) problem = "HTTP status $status, expected ${step.status}"
            if (problem != null) fail("$name: $problem")
            steps++
        }
        println("ok transcript $name")
    }
    // an image question through the wrapper (bytes → base64 in Kotlin), then a cancel from onToken
    val image = File(args[2]).readBytes()
    val withImage = bridge.generate("What does this image show?", maxTokens = 3, images = listOf(image))
    if (withImage.error != null || withImage.result == null) fail("image generate: ${withImage.error}")
    val id = Bridge.newId()
    var tokens = 0
    var found = false
    val out = bridge.generate("Describe pneumonia on a chest radiograph in detail.", maxTokens = 400, id = id) {
        tokens++
        if (tokens == 2) found = bridge.cancel(id)
    }
    if (!found || out.finishReason != "cancelled" || out.result != null) {
        fail("cancel: found=$found finish=${out.finishReason} result=${out.result}")
    }
    // a received study: listed, opened, asked about, reported, signed, exported (when the runtime keeps studies)
    var clinic = "no studies kept"
    val caps = bridge.health().getJSONObject("capabilities")
    if (caps.optBoolean("studies") && caps.optBoolean("reports")) {
        val studies = bridge.listStudies(limit = 5).getJSONArray("studies")
        if (studies.length() == 0) fail("list_studies: no studies")
        val studyUid = studies.getJSONObject(0).getString("study_uid")
        val series = bridge.getStudy(studyUid).getJSONArray("series")
        val instanceUid = series.getJSONObject(0).getJSONArray("instances").getJSONObject(0).getString("sop_instance_uid")
        val source = bridge.studySource(studyUid, instanceUid)
        val answer = bridge.generateAbout("Describe this image.", listOf(source), maxTokens = 3)
        if (answer.error != null || answer.result == null) fail("generate about a study: ${answer.error}")
        val finding = JSONObject().put("finding", "No acute abnormality").put("location", "head").put("certainty", "probable")
        val final = JSONObject().put("modality", "CT").put("findings", org.json.JSONArray().put(finding))
            .put("impression", "Normal study (Kotlin client test).").put("recommendation", "None.").put("needs_review", true)
        val saved = bridge.saveReport(final, JSONObject().put("study_uid", studyUid).put("instance_uid", instanceUid), draft = final)
        val id = saved.getString("report_id")
        val signed = bridge.signReport(id, saved.getInt("version"), "Dr Kotlin", "radiologist")
        if (signed.getString("status") != "signed") fail("sign_report: $signed")
        var conflict = ""
        try {
            bridge.signReport(id, saved.getInt("version"), "Dr Kotlin", "radiologist")
        } catch (e: BridgeClient.BridgeException) {
            conflict = e.code
        }
        if (conflict != "conflict") fail("a second sign must be a conflict, got '$conflict'")
        val sr = bridge.exportReport(id, "sr")
        if (sr.size < 132 || String(sr, 128, 4, Charsets.US_ASCII) != "DICM") fail("export_report sr: not a DICOM file")
        val pdf = bridge.exportReport(id, "pdf")
        if (String(pdf, 0, 5, Charsets.US_ASCII) != "%PDF-") fail("export_report pdf: not a PDF")
        clinic = "study ${series.length()} series, report $id signed, SR ${sr.size} bytes, PDF ${pdf.size} bytes"
    }
    println("ok kotlin $steps steps; image answer ${withImage.usage}; cancelled after $tokens tokens; $clinic")
}

fun fail(message: String): Nothing {
    println("FAIL $message")
    exitProcess(1)
}
