from vlm_vpr.cli import main

raise SystemExit(main())
