from harness.cli import interrupt_on_sigterm, main

interrupt_on_sigterm()
raise SystemExit(main())
