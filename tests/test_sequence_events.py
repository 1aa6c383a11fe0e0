"""SequenceEvents (shardmesh/sequence.py): a sequence's events reach its one reader in order, a
reader waiting is woken by the next put, and a get cancelled while waiting loses nothing."""

import asyncio

from shardmesh.sequence import RenderFailed, SequenceEvents


def test_events_in_order_before_and_while_the_reader_waits():
    async def main():
        events = SequenceEvents()
        events.put_nowait(1)
        events.put_nowait(2)
        got = [await events.get(), await events.get()]
        waiting = asyncio.ensure_future(events.get())
        await asyncio.sleep(0)
        assert not waiting.done() and events.empty()
        events.put_nowait(3)
        events.put_nowait(4)
        got.append(await asyncio.wait_for(waiting, 5))
        got.append(await asyncio.wait_for(events.get(), 5))
        return got, events.qsize()

    assert asyncio.run(main()) == ([1, 2, 3, 4], 0)


def test_a_cancelled_get_loses_no_event():
    async def main():
        events = SequenceEvents()
        cancelled = asyncio.ensure_future(events.get())
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        again = asyncio.ensure_future(events.get())  # a new reader, before any put
        await asyncio.sleep(0)
        events.put_nowait("a")
        first = await asyncio.wait_for(again, 5)
        # Woken and cancelled in the same turn: the event stays for the next get.
        late = asyncio.ensure_future(events.get())
        await asyncio.sleep(0)
        events.put_nowait("b")
        late.cancel()
        await asyncio.gather(late, return_exceptions=True)
        return first, late.cancelled(), await asyncio.wait_for(events.get(), 5)

    assert asyncio.run(main()) == ("a", True, "b")


def test_render_makes_each_token_events_item_as_it_is_put():
    async def main():
        events = SequenceEvents()
        rendered = []

        def render(event):
            if event == "bad":
                raise ValueError("cannot render")
            rendered.append(event)
            return f"<{event}>"

        events.render = render
        events.put_nowait("a")
        assert rendered == ["a"]  # made in put_nowait, not when read
        error = RuntimeError("step failed")
        events.put_nowait(error)  # exceptions pass as they are
        events.put_nowait("bad")
        events.put_nowait("b")
        return [await events.get() for _ in range(4)], error

    items, error = asyncio.run(main())
    assert items[0] == "<a>" and items[1] is error and items[3] == "<b>"
    assert isinstance(items[2], RenderFailed) and str(items[2].error) == "cannot render"
