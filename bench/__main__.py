"""`python -m bench`: the side-by-side benchmark (bench/suite.py); `python -m bench serve`: many
users through the HTTP API (bench/serve.py); `python -m bench soak`: clients under server
faults (bench/soak.py); `python -m bench seed`: the seed's 1B workload (bench/seed.py);
`python -m bench contention`: split vs in-process decode with one core kept busy (bench/contention.py);
`python -m bench chat`: multi-turn chat with and without the prefix cache (bench/chat.py);
`python -m bench speculative`: decoding with and without prompt-lookup speculation (bench/speculative.py);
`python -m bench proxy`: chat straight to the attested API and through `teegpu proxy` (bench/proxy.py);
`python -m bench tensor-parallel`: per-RPC cost of a 2-rank server against one (bench/tensor_parallel.py);
`python -m bench ring`: the otp mode's exact ring products per kernel (bench/ring.py)."""
import sys

from teegpu.options import let_idle_workers_sleep

let_idle_workers_sleep()  # before torch loads: this process is the split's trusted side

if sys.argv[1:2] == ["serve"]:
    from bench.serve import main

    main(sys.argv[2:])
elif sys.argv[1:2] == ["seed"]:
    from bench.seed import main

    main(sys.argv[2:])
elif sys.argv[1:2] == ["contention"]:
    from bench.contention import main

    main(sys.argv[2:])
elif sys.argv[1:2] == ["speculative"]:
    from bench.speculative import main

    main(sys.argv[2:])
elif sys.argv[1:2] == ["chat"]:
    from bench.chat import main

    main(sys.argv[2:])
elif sys.argv[1:2] == ["tensor-parallel"]:
    from bench.tensor_parallel import main

    main(sys.argv[2:])
elif sys.argv[1:2] == ["proxy"]:
    from bench.proxy import main

    main(sys.argv[2:])
elif sys.argv[1:2] == ["ring"]:
    from bench.ring import main

    main(sys.argv[2:])
elif sys.argv[1:2] == ["soak"]:
    from bench.soak import main

    main(sys.argv[2:])
else:
    from bench.suite import main

    main()
