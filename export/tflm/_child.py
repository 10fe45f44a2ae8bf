"""Child process of `dgst_tf.export.tflm.runner.run_tflm` (internal; do not import).

Run as ``python _child.py REQUEST.json``: a script, so it imports neither TensorFlow nor
dgst_tf (only NumPy, tflite_micro and the sibling ops_loader). It loads the kernel
libraries, builds the pip TFLM interpreter, invokes it once per input set, prints the
arena allocations to stderr and writes the outputs. TFLM may abort() the process: the parent
turns that into an exception. Progress markers on stderr tell the parent the phase.
"""
import json
import os
import pathlib
import sys

PHASE_MARK = "[dgst-tflm-child] phase: "


def _phase(text):
    sys.stderr.write(f"{PHASE_MARK}{text}\n")
    sys.stderr.flush()


def main(request_path):
    import faulthandler

    import numpy as np

    faulthandler.enable()  # a Python stack on SIGSEGV/SIGABRT, then the signal as usual
    request = json.loads(pathlib.Path(request_path).read_text())
    phase = "starting"
    try:
        phase = "loading the kernel libraries"
        _phase(phase)
        if request["libraries"]:
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            import ops_loader as tflm_ops_loader

            for library in request["libraries"]:
                tflm_ops_loader.load_library_global(library)
        from tflite_micro import runtime

        phase = "building the interpreter (op init, prepare and arena allocation)"
        _phase(phase)
        model = pathlib.Path(request["model"]).read_bytes()
        interpreter = runtime.Interpreter.from_bytes(
            model, custom_op_registerers=list(request["registerers"]),
            arena_size=int(request["arena_size"]))
        inputs = np.load(request["inputs"])
        count = int(request["invocations"])
        outputs = [[] for _ in range(int(request["num_outputs"]))]
        for i in range(count):
            phase = f"invoke {i + 1} of {count}"
            _phase(phase)
            for k in range(int(request["num_inputs"])):
                interpreter.set_input(inputs[f"input_{k}"][i], k)
            interpreter.invoke()
            for j, values in enumerate(outputs):
                values.append(np.array(interpreter.get_output(j), copy=True))
        phase = "printing the arena allocations"
        _phase(phase)
        interpreter.print_allocations()
        sys.stderr.flush()
        np.savez(request["outputs"], **{f"output_{j}": np.stack(values)
                                        for j, values in enumerate(outputs)})
        status = {"ok": True}
    except Exception as error:  # reported by the parent with the model's name
        status = {"ok": False, "phase": phase, "error": f"{type(error).__name__}: {error}"}
    pathlib.Path(request["status"]).write_text(json.dumps(status))
    _phase("done")


if __name__ == "__main__":
    main(sys.argv[1])
