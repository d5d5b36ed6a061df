"""Human side-by-side evaluation: `ncppo sbs serve | results | export`.

`items` pairs two `ncppo sample` folders into blind A/B items, `votes` appends and reads the
vote log (one JSON line per vote), `server` is the FastAPI voting page (`access`: its private
links, rate and body limits for `serve --annotators`), `results` turns votes into
win rates with two-stage bootstrap intervals and agreement, `export` turns them into
Pick-a-Pic-schema training pairs. See docs/sbs.md.
"""
