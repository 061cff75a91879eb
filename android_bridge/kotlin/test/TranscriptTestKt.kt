import java.io.File
import kotlin.system.exitProcess
import org.medgemma.edge.bridge.Bridge
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
    println("ok kotlin $steps steps; image answer ${withImage.usage}; cancelled after $tokens tokens")
}

fun fail(message: String): Nothing {
    println("FAIL $message")
    exitProcess(1)
}
