"""ChatGLM-6B, the earlier and simpler web page: the conversation as a transcript of question/answer pairs.

    python web_demo_old.py [--model-path DIR] [--quantize 4|8] [--port 7860] [--host 127.0.0.1] [--share]
                           [--auth USER:PASSWORD]

Same options, model and generation as web_demo.py; only the page differs.
"""
import gradio as gr

import web_common as web


def transcript(history) -> str:
    """The whole conversation as one HTML document, each turn a 用户 / ChatGLM-6B pair (labels as upstream): the
    user's text as typed, the reply's Markdown rendered, HTML in either shown as text."""
    turns = [f"<p><strong>用户：</strong></p>{web.render_typed(query)}"
             f"<p><strong>ChatGLM-6B：</strong></p>{web.render_reply(reply)}" for query, reply in history]
    return "<hr>".join(turns)


def transcript_view(value="") -> gr.Markdown:
    return gr.Markdown(value, elem_id="transcript", min_height=200, line_breaks=True)


def build_demo(service) -> gr.Blocks:
    with gr.Blocks(title="ChatGLM-6B", analytics_enabled=False) as demo:
        gr.Markdown("# ChatGLM-6B")
        web.add_notice(service.model)
        conversation = gr.State(web.Conversation())
        # the conversation first, the controls below it, as upstream laid this page out
        shown = transcript_view()
        with gr.Row():
            with gr.Column(scale=4):
                query = gr.Textbox(show_label=False, placeholder="Enter text and press enter", lines=1, max_lines=11,
                                   elem_id="query")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    clear = gr.Button("Clear", elem_id="clear")
            with gr.Column(scale=1):
                max_length, top_p, temperature = web.add_sliders()
                repetition_penalty, top_k, stop_strings = web.add_more_controls()

        web.connect(service, transcript, sends=[generate.click, query.submit], query=query,
                    conversation=conversation, view=shown, stop=stop, clears=[clear.click],
                    controls=[max_length, top_p, temperature, repetition_penalty, top_k, stop_strings])
    return demo


def main(argv=None):
    web.serve(__doc__.splitlines()[0], build_demo, argv)


if __name__ == "__main__":
    main()
