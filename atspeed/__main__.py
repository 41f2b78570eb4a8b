import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["pipeline"]:
        from atspeed.pipeline import main as pipeline

        pipeline(sys.argv[2:])
    elif sys.argv[1:2] == ["export"]:
        from atspeed.export_checkpoint import main as export

        export(sys.argv[2:])
    elif sys.argv[1:2] == ["sweep"]:
        from atspeed.sweep import main as sweep

        sys.exit(sweep(sys.argv[2:]))
    else:
        from atspeed.cli import main

        main()
