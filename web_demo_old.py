"""ChatGLM-6B, the earlier and simpler web page: the conversation as a transcript of question/answer pairs.

    python web_demo_old.py [--model-path DIR] [--quantize 4|8] [--port 7860] [--host 127.0.0.1] [--share]

Same options, model and generation as web_demo.py; only the page differs.
"""
import gradio as gr

import web_common as web


def transcript(history) -> str:
    """The whole conversation as one Markdown document, each turn a 用户 / ChatGLM-6B pair (labels as upstream)."""
    turns = [f"**用户：**\n\n{web.to_safe_markdown(query)}\n\n**ChatGLM-6B：**\n\n{web.to_safe_markdown(reply)}"
             for query, reply in history]
    return "\n\n---\n\n".join(turns)


def build_demo(tokenizer, model) -> gr.Blocks:
    with gr.Blocks(title="ChatGLM-6B", analytics_enabled=False) as demo:
        gr.Markdown("# ChatGLM-6B")
        web.add_notice(model)
        conversation = gr.State(web.Conversation())
        # the conversation first, the controls below it, as upstream laid this page out
        transcript_view = gr.Markdown(elem_id="transcript", min_height=200, line_breaks=True)
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

        gr.on([generate.click, query.submit], web.turn_handler(model, tokenizer, render=transcript),
                     inputs=[query, conversation, max_length, top_p, temperature, repetition_penalty, top_k,
                             stop_strings], outputs=[query, transcript_view],
                     concurrency_limit=None, trigger_mode="always_last")  # sent during a reply: goes after it
        stop.click(web.stop_handler, inputs=[conversation], outputs=None, concurrency_limit=None,
                   show_progress="hidden")
        clear.click(web.clear_handler(render=transcript), inputs=[conversation], outputs=[transcript_view],
                    concurrency_limit=None)
    return demo


def main(argv=None):
    args = web.parse_args(__doc__.splitlines()[0], argv)
    tokenizer, model = web.load(args)
    web.launch(build_demo(tokenizer, model), args)


if __name__ == "__main__":
    main()
