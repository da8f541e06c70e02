"""The fastlm command line: ``python -m fastlm COMMAND ...`` (also ``fastlm ...``); COMMANDS lists them."""
import importlib
import sys

COMMANDS = {
    "bench": ("fastlm.benchmark", "benchmark the kernels and the model against their peers (the main job)"),
    "summary": ("fastlm.summary", "parameters, FLOPs, memory and a roofline estimate for a model"),
    "train": ("fastlm.train", "train a model on a text corpus"),
    "generate": ("fastlm.generate", "generate text from a checkpoint"),
    "scaling": ("fastlm.scaling", "train a ladder of model sizes and fit loss against parameters"),
    "export": ("fastlm.hf", "write a checkpoint as a transformers model directory (save_pretrained)"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: python -m fastlm COMMAND [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.cli(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
