import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["pipeline"]:
        from atspeed.pipeline import main as pipeline

        pipeline(sys.argv[2:])
    else:
        from atspeed.cli import main

        main()
